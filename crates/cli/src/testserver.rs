//! A stand-in daemon for unit tests: records each request and answers it
//! with what the test's function says.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::{Client, ClientOptions};

/// One request as received.
#[derive(Debug, Clone)]
pub struct Request {
    /// GET, POST, DELETE.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl Request {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }
}

/// A listening stand-in.
pub struct FakeDaemon {
    /// Its base URL.
    pub url: String,
    seen: Arc<Mutex<Vec<Request>>>,
}

type Responder = dyn Fn(&Request) -> (u16, String) + Send + Sync;

impl FakeDaemon {
    /// Serves on a loopback port until the test process ends.
    pub fn start(respond: impl Fn(&Request) -> (u16, String) + Send + Sync + 'static) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let respond: Arc<Responder> = Arc::new(respond);
        let s2 = seen.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { continue };
                let seen = s2.clone();
                let respond = respond.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut parts = line.split_whitespace();
                    let method = parts.next().unwrap_or("").to_string();
                    let path = parts.next().unwrap_or("").to_string();
                    let mut headers = Vec::new();
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).unwrap();
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        let (k, v) = h.split_once(':').unwrap();
                        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                    }
                    let len = headers
                        .iter()
                        .find(|(k, _)| k == "content-length")
                        .map(|(_, v)| v.parse::<usize>().unwrap())
                        .unwrap_or(0);
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    let req = Request {
                        method,
                        path,
                        headers,
                        body: String::from_utf8(body).unwrap(),
                    };
                    let (status, body) = respond(&req);
                    seen.lock().unwrap().push(req);
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(resp.as_bytes());
                });
            }
        });
        FakeDaemon { url, seen }
    }

    /// A client of it, with `token`.
    pub fn client(&self, token: Option<&str>) -> Client {
        Client::new(&ClientOptions {
            url: self.url.clone(),
            token: token.map(str::to_string),
            ca_cert: None,
            timeout: Duration::from_secs(10),
        })
        .unwrap()
    }

    /// The requests so far, in the order they were answered.
    pub fn requests(&self) -> Vec<Request> {
        self.seen.lock().unwrap().clone()
    }
}
