//! Sends one shadow request to a backend and reads its answer, up to the body limit, within
//! the route's shadow timeout. The only I/O of the shadow module.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;

use super::compare::Answer;

/// What a shadow request brought back.
pub enum Fetched {
    Answer(Answer),
    /// The answer's body was above the limit: not compared.
    TooLarge,
}

/// Sends `request` with `body` to `peer`; an error text when it failed or took too long.
pub async fn fetch(
    connector: &Connector,
    peer: &HttpPeer,
    request: RequestHeader,
    body: Bytes,
    limit: usize,
    timeout: Duration,
) -> Result<Fetched, String> {
    match tokio::time::timeout(timeout, exchange(connector, peer, request, body, limit)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

async fn exchange(
    connector: &Connector,
    peer: &HttpPeer,
    request: RequestHeader,
    body: Bytes,
    limit: usize,
) -> Result<Fetched, String> {
    let (mut session, _reused) =
        connector.get_http_session(peer).await.map_err(|e| format!("connect: {e}"))?;
    session.write_request_header(Box::new(request)).await.map_err(|e| format!("send: {e}"))?;
    if !body.is_empty() {
        session.write_request_body(body, true).await.map_err(|e| format!("send body: {e}"))?;
    }
    session.finish_request_body().await.map_err(|e| format!("send body: {e}"))?;
    session.read_response_header().await.map_err(|e| format!("read: {e}"))?;
    let header = session.response_header().ok_or("no response header")?;
    let (status, headers) = (header.status.as_u16(), header.headers.clone());
    let mut received = BytesMut::new();
    while let Some(chunk) = session.read_response_body().await.map_err(|e| format!("read: {e}"))? {
        if received.len() + chunk.len() > limit {
            // The rest is not read: the connection is not reused.
            return Ok(Fetched::TooLarge);
        }
        received.extend_from_slice(&chunk);
    }
    let body = received.freeze();
    connector.release_http_session(session, peer, Some(Duration::from_secs(60))).await;
    Ok(Fetched::Answer(Answer { status, headers, body }))
}
