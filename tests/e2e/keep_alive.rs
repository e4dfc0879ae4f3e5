//! One connection, many requests: an answer given before the request body
//! was read (a 401 on a bad token) must not cost the client its connection.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::helpers::spawn_app;

/// Reads one HTTP/1.1 response (Content-Length framed): status, headers, body.
async fn read_response(stream: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>, String) {
    let mut status_line = String::new();
    let n = stream.read_line(&mut status_line).await.unwrap();
    assert!(n > 0, "the server closed the connection");
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).await.unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.unwrap();
    (status, headers, String::from_utf8(body).unwrap())
}

#[tokio::test]
async fn a_401_before_the_body_keeps_the_connection_usable() {
    let app = spawn_app().await;
    let url = reqwest::Url::parse(&app.base).unwrap();
    let addr = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let path = format!("{}/sign-out", url.path());
    let mut stream = BufReader::new(TcpStream::connect(&addr).await.unwrap());
    let body = r#"{"everywhere":false}"#;
    for round in 0..5 {
        // Headers first, the body a moment later: the handler could answer
        // (bad token) before the body has arrived.
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer not-a-token\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        stream.get_mut().write_all(head.as_bytes()).await.unwrap();
        stream.get_mut().flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The write may fail only if the server has already hung up.
        let _ = stream.get_mut().write_all(body.as_bytes()).await;
        let (status, headers, text) = read_response(&mut stream).await;
        assert_eq!(status, 401, "round {round}: {text}");
        assert!(
            !headers
                .iter()
                .any(|(n, v)| n == "connection" && v.eq_ignore_ascii_case("close")),
            "round {round}: the server asked to close"
        );
        let id = headers.iter().find(|(n, _)| n == "x-request-id");
        assert!(id.is_some(), "round {round}: no request id echoed");

        // The next request on the same connection is answered.
        let next =
            format!("GET /health HTTP/1.1\r\nhost: {addr}\r\nx-request-id: probe-{round}\r\n\r\n");
        stream.get_mut().write_all(next.as_bytes()).await.unwrap();
        let (status, headers, text) = read_response(&mut stream).await;
        assert_eq!(status, 200, "round {round}: {text}");
        assert!(headers
            .iter()
            .any(|(n, v)| n == "x-request-id" && *v == format!("probe-{round}")));
    }
}
