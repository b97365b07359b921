//! A real `redis-server` on a loopback port, started and stopped by the test that owns it.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tempfile::TempDir;

use crate::{Error, Result, which};

/// A running (or stopped, restartable) redis-server.
pub struct RedisServer {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free loopback port, with an fsynced append-only file.
    pub fn start() -> Result<Self> {
        if which("redis-server").is_none() {
            return Err(Error::Missing {
                program: "redis-server",
            });
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut server = Self {
            port,
            dir: TempDir::new()?,
            child: None,
        };
        server.restart()?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Stops the server (SIGKILL: an outage, not a clean shutdown).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, with the data it had written.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            // Durable like a production sink: every write is on disk before it is acknowledged,
            // so a restart (an outage) loses nothing.
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(["--protected-mode", "yes", "--dir"])
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "redis-server did not answer PING",
        )))
    }

    /// Sends one inline command and returns the raw reply (for assertions in tests).
    pub fn command(&self, line: &str) -> Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(format!("{line}\r\n").as_bytes())?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 65536];
        // Read until the reply looks complete (good enough for small test replies).
        loop {
            let n = stream.read(&mut buf)?;
            reply.extend_from_slice(&buf[..n]);
            if n == 0 || n < buf.len() {
                break;
            }
        }
        Ok(String::from_utf8_lossy(&reply).into_owned())
    }

    fn ping(&self) -> bool {
        self.command("PING").is_ok_and(|r| r.starts_with("+PONG"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
