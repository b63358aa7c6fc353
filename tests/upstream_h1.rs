//! Sluice's HTTP/1.1 client against scripted backends: raw TCP servers that
//! write exactly the bytes a test needs, so each framing rule and each
//! failure is exercised on a real connection.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::{get, raw_exchange, start_proxy, with_workers};

/// A backend whose `n`th connection (from 0) is handled by `script`.
async fn scripted<F, Fut>(script: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(usize, TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let conns = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&conns);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(script(n, stream));
        }
    });
    (addr, conns)
}

/// Reads one request (head and a Content-Length or chunked body without
/// trailers) and returns its bytes; `None` when the peer closed first.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let mut total = end + 4;
            if let Some(len) = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse::<usize>().ok())
            {
                total += len;
            } else if head.contains("transfer-encoding: chunked") {
                match find(&buf[total..], b"0\r\n\r\n") {
                    Some(at) => total += at + 5,
                    None => total = usize::MAX,
                }
            }
            if buf.len() >= total {
                let request = buf[..total].to_vec();
                buf.drain(..total);
                return Some(request);
            }
        }
        let mut chunk = [0u8; 65536];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One worker: these tests count the backend connections its one pool
/// opens and reuses, whichever client connection a request came on.
fn config(backend: SocketAddr) -> String {
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{backend}\"]\n"
    );
    with_workers(1, &text)
}

async fn proxy_for(backend: SocketAddr) -> (sluice::runtime::Running, SocketAddr) {
    let proxy = start_proxy(&config(backend)).await;
    let addr = proxy.listener_addr("web").expect("bound");
    (proxy, addr)
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

#[tokio::test]
async fn a_pooled_connection_the_backend_closed_is_replaced_without_an_error() {
    // The first connection answers one request, then takes the next one
    // and closes without answering: what a keep-alive timeout racing a
    // new request looks like from the proxy.
    let (backend, conns) = scripted(|n, mut s| async move {
        let mut buf = Vec::new();
        while read_request(&mut s, &mut buf).await.is_some() {
            if n == 0 && s.write_all(OK).await.is_ok() {
                let _ = read_request(&mut s, &mut buf).await;
                return;
            }
            let _ = s.write_all(OK).await;
        }
    })
    .await;
    let (_proxy, addr) = proxy_for(backend).await;
    for _ in 0..3 {
        let answer = get(addr, "/").await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, "ok");
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        2,
        "one replacement connection"
    );
}

#[tokio::test]
async fn a_connection_closed_while_pooled_is_not_used() {
    // Every connection answers one request with keep-alive, then closes.
    let (backend, conns) = scripted(|_, mut s| async move {
        let mut buf = Vec::new();
        if read_request(&mut s, &mut buf).await.is_some() {
            let _ = s.write_all(OK).await;
        }
    })
    .await;
    let (_proxy, addr) = proxy_for(backend).await;
    for i in 1..=3 {
        assert_eq!(get(addr, "/").await.status, 200);
        while conns.load(Ordering::SeqCst) < i {
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(conns.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn interim_responses_are_skipped() {
    let (backend, _) = scripted(|_, mut s| async move {
        let mut buf = Vec::new();
        while read_request(&mut s, &mut buf).await.is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n")
                .await;
            let _ = s.write_all(OK).await;
        }
    })
    .await;
    let (_proxy, addr) = proxy_for(backend).await;
    let answer = get(addr, "/").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "ok");
}

#[tokio::test]
async fn a_body_ended_by_close_is_relayed_and_its_connection_not_reused() {
    let (backend, conns) = scripted(|_, mut s| async move {
        let mut buf = Vec::new();
        if read_request(&mut s, &mut buf).await.is_some() {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil ").await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = s.write_all(b"the end").await;
        }
    })
    .await;
    let (_proxy, addr) = proxy_for(backend).await;
    for _ in 0..2 {
        let answer = get(addr, "/").await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, "until the end");
    }
    assert_eq!(conns.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn chunked_responses_keep_their_trailers_and_their_connection() {
    let (backend, conns) = scripted(|_, mut s| async move {
        let mut buf = Vec::new();
        while read_request(&mut s, &mut buf).await.is_some() {
            let _ = s
                .write_all(
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n",
                )
                .await;
            let _ = s.write_all(b"5;ext=1\r\nhello\r\n").await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            let _ = s.write_all(b"6\r\n world\r\n0\r\nx-sum: 42\r\n\r\n").await;
        }
    })
    .await;
    let (_proxy, addr) = proxy_for(backend).await;
    for _ in 0..2 {
        let text = raw_exchange(
            addr,
            b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("transfer-encoding: chunked"), "{text}");
        assert!(text.ends_with("0\r\nx-sum: 42\r\n\r\n"), "{text}");
        let body: String = text
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        assert!(body.contains("hello") && body.contains(" world"), "{text}");
    }
    assert_eq!(conns.load(Ordering::SeqCst), 1, "the connection was reused");
}

#[tokio::test]
async fn head_and_no_content_responses_have_no_body() {
    let (backend, conns) = scripted(|_, mut s| async move {
        let mut buf = Vec::new();
        while let Some(req) = read_request(&mut s, &mut buf).await {
            let reply: &[u8] = if req.starts_with(b"HEAD") {
                b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"
            } else {
                b"HTTP/1.1 204 No Content\r\n\r\n"
            };
            let _ = s.write_all(reply).await;
        }
    })
    .await;
    let (_proxy, addr) = proxy_for(backend).await;
    let text = raw_exchange(
        addr,
        b"HEAD / HTTP/1.1\r\nhost: a\r\n\r\nGET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        text.starts_with(
            "HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nHTTP/1.1 204 No Content\r\n"
        ),
        "{text}"
    );
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn invalid_responses_are_502_bad_response() {
    let (backend, _) = scripted(|n, mut s| async move {
        let mut buf = Vec::new();
        if read_request(&mut s, &mut buf).await.is_some() {
            let reply: &[u8] = match n {
                0 => b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
                1 => b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n",
                _ => b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
            };
            let _ = s.write_all(reply).await;
        }
    })
    .await;
    let (_proxy, addr) = proxy_for(backend).await;
    for _ in 0..3 {
        let answer = get(addr, "/").await;
        assert_eq!(answer.status, 502);
        assert_eq!(answer.headers["sluice-error"], "bad-response");
    }
}

#[tokio::test]
async fn a_backend_closing_before_the_head_is_502_upstream_reset() {
    let (backend, conns) = scripted(|_, mut s| async move {
        let mut buf = Vec::new();
        let _ = read_request(&mut s, &mut buf).await;
    })
    .await;
    let (_proxy, addr) = proxy_for(backend).await;
    let answer = get(addr, "/").await;
    assert_eq!(answer.status, 502);
    assert_eq!(answer.headers["sluice-error"], "upstream-reset");
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "a fresh connection is not retried"
    );
}

#[tokio::test]
async fn request_bodies_are_framed_for_the_backend() {
    // The backend answers with the request it received.
    let (backend, _) = scripted(|_, mut s| async move {
        let mut buf = Vec::new();
        while let Some(req) = read_request(&mut s, &mut buf).await {
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", req.len());
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(&req).await;
        }
    })
    .await;
    let (_proxy, addr) = proxy_for(backend).await;
    let text = raw_exchange(
        addr,
        b"POST /c HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n\
          PUT /l HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\nconnection: close\r\n\r\nwxyz",
        Duration::from_secs(5),
    )
    .await;
    let chunked = text.find("POST /c HTTP/1.1\r\n").expect("first request");
    let rest = &text[chunked..];
    assert!(rest.contains("transfer-encoding: chunked\r\n"), "{text}");
    assert!(
        rest.contains("\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"),
        "{text}"
    );
    let length = text.find("PUT /l HTTP/1.1\r\n").expect("second request");
    let rest = &text[length..];
    assert!(rest.contains("content-length: 4\r\n"), "{text}");
    assert!(rest.ends_with("\r\n\r\nwxyz"), "{text}");
    assert!(!rest.contains("transfer-encoding"), "{text}");
}

#[tokio::test]
async fn large_bodies_stream_both_ways_at_once() {
    // The backend echoes each read as a chunk as soon as it has it, so
    // neither side can wait for the other to finish.
    let (backend, _) = scripted(|_, mut s| async move {
        let mut buf = vec![0u8; 65536];
        let mut head = Vec::new();
        let length = loop {
            let n = match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            head.extend_from_slice(&buf[..n]);
            if let Some(end) = find(&head, b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
                let len: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                head.drain(..end + 4);
                break len;
            }
        };
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .await;
        let mut seen = 0;
        let mut pending = head;
        loop {
            if !pending.is_empty() {
                seen += pending.len();
                let frame = [
                    format!("{:x}\r\n", pending.len()).into_bytes(),
                    std::mem::take(&mut pending),
                    b"\r\n".to_vec(),
                ]
                .concat();
                if s.write_all(&frame).await.is_err() {
                    return;
                }
            }
            if seen >= length {
                break;
            }
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        }
        let _ = s.write_all(b"0\r\n\r\n").await;
    })
    .await;
    let (_proxy, addr) = proxy_for(backend).await;
    const SIZE: usize = 16 * 1024 * 1024;
    let body: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let mut client = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: {SIZE}\r\nconnection: close\r\n\r\n"
    );
    let (mut rd, mut wr) = client.split();
    let send = async {
        wr.write_all(head.as_bytes()).await.expect("head");
        wr.write_all(&body).await.expect("body");
    };
    let mut received = Vec::new();
    let recv = rd.read_to_end(&mut received);
    let (_, got) =
        tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(send, recv) })
            .await
            .expect("no deadlock");
    got.expect("read");
    let end = find(&received, b"\r\n\r\n").expect("head") + 4;
    assert!(received.starts_with(b"HTTP/1.1 200 OK\r\n"));
    // Undo the chunked coding.
    let mut decoded = Vec::with_capacity(SIZE);
    let mut rest = &received[end..];
    loop {
        let line = find(rest, b"\r\n").expect("size line");
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..line]).expect("hex"), 16)
            .expect("size");
        rest = &rest[line + 2..];
        if size == 0 {
            break;
        }
        decoded.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
    assert_eq!(decoded.len(), SIZE);
    assert!(decoded == body, "the echo matches");
}

#[tokio::test]
async fn response_fields_are_relayed_without_hop_by_hop_ones() {
    let (backend, _) = scripted(|_, mut s| async move {
        let mut buf = Vec::new();
        while read_request(&mut s, &mut buf).await.is_some() {
            let _ = s
                .write_all(
                    b"HTTP/1.1 200 OK\r\nServer: up\r\nConnection: keep-alive, X-Secret\r\n\
                      X-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: x\r\n\
                      Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 2\r\n\r\nok",
                )
                .await;
        }
    })
    .await;
    let (_proxy, addr) = proxy_for(backend).await;
    // An HTTP/1.1 client gets the fields as the backend wrote them.
    let text = raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        text,
        "HTTP/1.1 200 OK\r\nServer: up\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\
         content-length: 2\r\nconnection: close\r\n\r\nok"
    );
    // So does an HTTP/2 client, through a header map.
    let req = http::Request::get(format!("http://{addr}/"))
        .body(support::empty())
        .expect("request");
    let answer = support::send(&support::h2_client(), req).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "ok");
    // (hyper's HTTP/2 server adds `date`.)
    let mut names: Vec<&str> = answer
        .headers
        .keys()
        .map(|k| k.as_str())
        .filter(|k| *k != "date")
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["content-length", "server", "set-cookie"]);
    assert_eq!(answer.headers.get_all("set-cookie").iter().count(), 2);
}
