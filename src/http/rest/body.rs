//! Request bodies: JSON only, bounded in size and in time.

use futures_util::{Stream, StreamExt};
use warp::http::StatusCode;
use warp::{Buf, Filter, Rejection};

use super::super::ApiError;

/// The request body: JSON (`Content-Type: application/json`, so that a web page cannot send
/// one without a CORS preflight), at most `limit` bytes (a larger `content-length` is refused
/// before anything is read, a chunked body as soon as it passes `limit`), sent within
/// `timeout` (a client that announces a body and stalls is answered 408).
pub fn body(
    limit: u64,
    timeout: std::time::Duration,
) -> impl Filter<Extract = (Vec<u8>,), Error = Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and(warp::header::optional::<String>("content-type"))
        .and_then(
            move |length: Option<u64>, content_type: Option<String>| async move {
                let json = content_type.as_deref().is_some_and(|t| {
                    let essence = t.split(';').next().unwrap_or("").trim();
                    essence.eq_ignore_ascii_case("application/json")
                        || (essence.len() > 5
                            && essence[..essence.len() - 5].contains('/')
                            && essence.to_ascii_lowercase().ends_with("+json"))
                });
                if !json {
                    return Err(warp::reject::custom(ApiError::new(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "PGRST102",
                        "Send the body as JSON with Content-Type: application/json",
                    )));
                }
                match length {
                    Some(length) if length > limit => Err(warp::reject::custom(too_large(limit))),
                    _ => Ok(()),
                }
            },
        )
        .untuple_one()
        .and(warp::body::stream())
        .and_then(move |stream| async move {
            match tokio::time::timeout(timeout, read_limited(stream, limit)).await {
                Ok(read) => read.map_err(warp::reject::custom),
                Err(_) => Err(warp::reject::custom(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "PGRST102",
                    format!(
                        "The request body did not arrive within {} s",
                        timeout.as_secs()
                    ),
                ))),
            }
        })
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "PGRST102",
        format!("The request body is larger than the limit of {limit} bytes"),
    )
}

async fn read_limited<S, B>(stream: S, limit: u64) -> Result<Vec<u8>, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut stream = std::pin::pin!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let mut chunk = chunk.map_err(|err| {
            tracing::debug!(error = %err, "reading a request body failed");
            super::error::bad_body("The request body could not be read")
        })?;
        if (out.len() + chunk.remaining()) as u64 > limit {
            return Err(too_large(limit));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            out.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(out)
}
