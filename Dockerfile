# Build: the release binary, with dependencies cached in their own layer.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked && rm -rf src
COPY sql sql
# Compiled into the binary: the JS client (/client.js) and the dashboard (/).
COPY clients/js/pgrelay.js clients/js/pgrelay.d.ts clients/js/
COPY dashboard dashboard
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

# Run: a small image with just the binary.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 pgrelay
COPY --from=build /src/target/release/pgrelay /usr/local/bin/pgrelay
USER pgrelay
EXPOSE 8080
# Healthy while the process answers HTTP on the port CMD listens on (/healthz; /readyz says
# whether capture is connected). The slim image has no curl: bash's /dev/tcp does.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["pgrelay"]
# Listening on every interface needs authentication (PGRELAY_JWT_SECRET, a config file with
# API keys, ...) or an explicit PGRELAY_ALLOW_ANONYMOUS=true; without either the relay
# refuses to start and says so. DATABASE_URL and PGRELAY_TABLES configure the rest.
CMD ["serve", "--listen", "0.0.0.0:8080"]
