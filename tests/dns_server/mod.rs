//! A DNS server in the test process: hickory-server on a loopback UDP
//! port, answering every name with addresses the test sets (or SERVFAIL).
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_server::authority::MessageResponseBuilder;
use hickory_server::proto::op::{Header, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::ServerFuture;

/// What the test DNS server answers for every name.
#[derive(Clone, Debug)]
pub enum Answer {
    /// These addresses (A or AAAA as asked), TTL 60 s.
    Records(Vec<IpAddr>),
    /// SERVFAIL.
    Fail,
}

#[derive(Clone)]
struct Zone(Arc<Mutex<Answer>>);

#[async_trait::async_trait]
impl RequestHandler for Zone {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let answer = self.0.lock().expect("zone").clone();
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut header = Header::response_from_request(request.header());
        header.set_authoritative(true);
        let query = request
            .queries()
            .first()
            .map(|q| (q.name().clone(), q.query_type()));
        let sent = match (answer, query) {
            (Answer::Records(ips), Some((name, kind))) => {
                let name: Name = name.into();
                // A TTL far longer than the refresh: discovery must ask
                // again anyway.
                let records: Vec<Record> = ips
                    .iter()
                    .filter_map(|ip| match (ip, kind) {
                        (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(*v4))),
                        (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(*v6))),
                        _ => None,
                    })
                    .map(|rdata| Record::from_rdata(name.clone(), 60, rdata))
                    .collect();
                let message = builder.build(header, records.iter(), [], [], []);
                response.send_response(message).await
            }
            _ => {
                header.set_response_code(ResponseCode::ServFail);
                response
                    .send_response(builder.build_no_records(header))
                    .await
            }
        };
        sent.unwrap_or_else(|_| {
            let mut header = Header::new();
            header.set_response_code(ResponseCode::ServFail);
            header.into()
        })
    }
}

/// A DNS server on a loopback UDP port whose answer the test sets.
pub struct DnsServer {
    pub addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    pub async fn start(ips: Vec<IpAddr>) -> DnsServer {
        let answer = Arc::new(Mutex::new(Answer::Records(ips)));
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind dns");
        let addr = socket.local_addr().expect("addr");
        let mut server = ServerFuture::new(Zone(Arc::clone(&answer)));
        server.register_socket(socket);
        let task = tokio::spawn(async move {
            let _ = server.block_until_done().await;
        });
        DnsServer { addr, answer, task }
    }

    pub fn set(&self, answer: Answer) {
        *self.answer.lock().expect("zone") = answer;
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
