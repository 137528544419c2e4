# Build: the release binary, with dependencies cached in their own layer.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked && rm -rf src
COPY sql sql
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

# Run: a small image with just the binary.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 pgrelay
COPY --from=build /src/target/release/pgrelay /usr/local/bin/pgrelay
USER pgrelay
EXPOSE 8080
ENTRYPOINT ["pgrelay"]
# Listening on every interface needs authentication (PGRELAY_JWT_SECRET, a config file with
# API keys, ...) or an explicit PGRELAY_ALLOW_ANONYMOUS=true; without either the relay
# refuses to start and says so. DATABASE_URL and PGRELAY_TABLES configure the rest.
CMD ["serve", "--listen", "0.0.0.0:8080"]
