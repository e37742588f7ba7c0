//! An in-process HTTP/1.1 server answering every request from a closure: the stand-in for an
//! upstream, a token realm or a cloud API whose answer a test writes itself (a redirect, a
//! challenge, a signed-request check). It keeps every request it saw, body included.
//!
//! Does not own: a real registry (`registry`) or the tap in front of one (`tap`); use this only
//! for answers a real server cannot be made to give.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::ca::test_ca;

/// What a `Scripted` server answers: `answer(request, n)`, `n` counting requests from 1.
pub type Answer = Arc<dyn Fn(&Request<Bytes>, usize) -> Response<Full<Bytes>> + Send + Sync>;

/// A server on 127.0.0.1 port 0 answering with its `Answer`. Stops when dropped.
pub struct Scripted {
    url: String,
    seen: Arc<Mutex<Vec<Request<Bytes>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Scripted {
    pub async fn start(answer: Answer) -> Scripted {
        Scripted::serve(answer, None).await
    }

    /// Over TLS, with a certificate for 127.0.0.1 from the test CA (`test_ca`), which a client
    /// trusts through `client.ca_file`.
    pub async fn start_tls(answer: Answer) -> Scripted {
        let (leaf, key) = test_ca().leaf();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Scripted::serve(answer, Some(acceptor)).await
    }

    async fn serve(answer: Answer, tls: Option<tokio_rustls::TlsAcceptor>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (answer, log, tls) = (Arc::clone(&answer), Arc::clone(&log), tls.clone());
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (answer, log) = (Arc::clone(&answer), Arc::clone(&log));
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes());
                            let req = Request::from_parts(parts, body.unwrap_or_default());
                            let n = {
                                let mut log = log.lock().unwrap();
                                log.push(req.clone());
                                log.len()
                            };
                            Ok::<_, Infallible>(answer(&req, n))
                        }
                    });
                tokio::spawn(async move {
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Some(tls) => {
                            let Ok(stream) = tls.accept(stream).await else {
                                return;
                            };
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        Scripted {
            url: format!("{scheme}://127.0.0.1:{port}"),
            seen,
            task,
        }
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// How many requests it has answered.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A response with `status`, a `content-type` and `body`.
pub fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// The value of header `name`, if present and text.
pub fn header<'a, B>(req: &'a Request<B>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}
