//! `moto_server` (Python `moto[server]`, installed by scripts/install-deps): a real S3
//! protocol server on loopback for the object-store tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A moto S3 server on a free loopback port, killed on drop.
pub struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    pub fn start() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "moto_server (Python moto[server]) is needed: run scripts/install-deps ({e})"
                )
            });
        // Ready when it says where it listens (werkzeug's " * Running on http://..."); its
        // stderr is drained for as long as it runs.
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("Running on") {
                    let _ = tx.send(());
                }
            }
        });
        let moto = Moto { child, port };
        ready
            .recv_timeout(Duration::from_secs(60))
            .expect("moto_server never said it was listening");
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_ok(),
            "moto_server does not listen on {port}"
        );
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (moto takes unsigned requests).
    pub fn create_bucket(&self, name: &str) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "create bucket: {reply}");
    }

    /// Points `cmd` at this server with test credentials through the standard AWS variables
    /// (and no other `AWS_*` variable of the environment).
    pub fn configure(&self, cmd: &mut Command) {
        for (k, _) in std::env::vars() {
            if k.starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL", self.endpoint())
            .env("AWS_ALLOW_HTTP", "true");
    }

    /// Kills the server (a store that went away mid-restore).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
