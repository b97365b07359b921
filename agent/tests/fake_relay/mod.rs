//! A protocol-level stand-in for the relay, for the faults the real relay cannot produce on
//! demand: a terminal `Nack` or a version-1 `Error` for a well-formed report, other limits on
//! the next connection, connections that take a report and close. It listens (push mode) or
//! dials an agent's `--listen` socket (pull mode) and serves both the same way.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use guestwatch_protocol::{
    Ack, AckStatus, Connection, ErrorCode, Hello, Limits, Message, Nack, NackReason, Report,
    ReportId, Welcome,
};
use tokio::{net::UnixListener, sync::watch};

/// What the fake answers a report with.
#[derive(Clone, Debug)]
pub enum Reply {
    Answer(Message),
    /// Close the connection without answering.
    Close,
    /// Keep the connection open and never answer.
    Silence,
}

type Answer = dyn Fn(&Report) -> Reply + Send + Sync;

/// What the fake saw.
#[derive(Default)]
pub struct Seen {
    pub hellos: Vec<Hello>,
    /// (connection number, report id) of every report received.
    pub reports: Vec<(usize, ReportId)>,
    /// Every report received, whole.
    pub bodies: Vec<Report>,
}

pub struct FakeRelay {
    pub path: PathBuf,
    pub seen: Arc<Mutex<Seen>>,
    limits: Arc<Mutex<(u32, u32)>>,
    /// The protocol version and features announced to connections from now on.
    protocol: Arc<Mutex<(u16, Vec<String>)>>,
    answer: Arc<Mutex<Arc<Answer>>>,
    /// Bumped to make every open connection close.
    hang_up: watch::Sender<u64>,
    /// Connections made so far (accepted or dialed).
    number: Arc<Mutex<usize>>,
}

impl FakeRelay {
    /// Listens on `dir/relay.sock`, announcing `max_frame` and a 64 MiB payload limit, with
    /// pings due every second.
    pub fn start(
        dir: &Path,
        max_frame: u32,
        answer: impl Fn(&Report) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let path = dir.join("relay.sock");
        let listener = UnixListener::bind(&path).expect("binding the fake relay");
        let relay = Self::dialing(max_frame, answer);
        let relay = Self { path, ..relay };
        let accepting = relay.clone_handles();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepting.serve(stream);
            }
        });
        relay
    }

    /// A fake relay that only dials (pull mode): see [`FakeRelay::dial`].
    pub fn dialing(
        max_frame: u32,
        answer: impl Fn(&Report) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let (hang_up, _) = watch::channel(0u64);
        Self {
            path: PathBuf::new(),
            seen: Arc::new(Mutex::new(Seen::default())),
            limits: Arc::new(Mutex::new((max_frame, 64 << 20))),
            protocol: Arc::new(Mutex::new((2, vec!["zstd".into(), "delta".into()]))),
            answer: Arc::new(Mutex::new(Arc::new(answer))),
            hang_up,
            number: Arc::new(Mutex::new(0)),
        }
    }

    /// Connects to an agent listening on `socket` and serves the connection; false if the
    /// connection failed.
    pub async fn dial(&self, socket: &Path) -> bool {
        match tokio::net::UnixStream::connect(socket).await {
            Ok(stream) => {
                self.clone_handles().serve(stream);
                true
            }
            Err(_) => false,
        }
    }

    fn clone_handles(&self) -> Self {
        Self {
            path: self.path.clone(),
            seen: self.seen.clone(),
            limits: self.limits.clone(),
            protocol: self.protocol.clone(),
            answer: self.answer.clone(),
            hang_up: self.hang_up.clone(),
            number: self.number.clone(),
        }
    }

    fn serve(&self, stream: tokio::net::UnixStream) {
        let number = {
            let mut n = self.number.lock().unwrap();
            *n += 1;
            *n - 1
        };
        tokio::spawn(serve(
            stream,
            number,
            self.seen.clone(),
            self.limits.clone(),
            self.protocol.clone(),
            self.answer.clone(),
            self.hang_up.subscribe(),
        ));
    }

    /// Limits announced to connections from now on.
    pub fn set_limits(&self, max_frame: u32, max_report_payload: u32) {
        *self.limits.lock().unwrap() = (max_frame, max_report_payload);
    }

    /// The version (1 or 2) and features announced to connections from now on.
    pub fn set_protocol(&self, version: u16, features: &[&str]) {
        *self.protocol.lock().unwrap() =
            (version, features.iter().map(|f| (*f).to_owned()).collect());
    }

    /// Every report received, whole.
    pub fn bodies(&self) -> Vec<Report> {
        self.seen.lock().unwrap().bodies.clone()
    }

    pub fn set_answer(&self, answer: impl Fn(&Report) -> Reply + Send + Sync + 'static) {
        *self.answer.lock().unwrap() = Arc::new(answer);
    }

    /// Closes every open connection (as a relay restart would).
    pub fn hang_up(&self) {
        self.hang_up.send_modify(|n| *n += 1);
    }

    pub fn connections(&self) -> usize {
        self.seen.lock().unwrap().hellos.len()
    }

    /// (connection number, report id) of every report received.
    pub fn reports_by_connection(&self) -> Vec<(usize, ReportId)> {
        self.seen.lock().unwrap().reports.clone()
    }

    pub fn reports(&self) -> Vec<ReportId> {
        self.seen
            .lock()
            .unwrap()
            .reports
            .iter()
            .map(|(_, id)| *id)
            .collect()
    }
}

async fn serve(
    stream: tokio::net::UnixStream,
    number: usize,
    seen: Arc<Mutex<Seen>>,
    limits: Arc<Mutex<(u32, u32)>>,
    protocol: Arc<Mutex<(u16, Vec<String>)>>,
    answer: Arc<Mutex<Arc<Answer>>>,
    mut hang_up: watch::Receiver<u64>,
) {
    let mut conn = Connection::new(
        stream,
        Limits {
            max_frame: 64 << 20,
        },
    );
    let Ok(Some(Message::Hello(hello))) = conn.read_message().await else {
        return;
    };
    seen.lock().unwrap().hellos.push(hello);
    let (max_frame, max_report_payload) = *limits.lock().unwrap();
    let (version, features) = protocol.lock().unwrap().clone();
    conn.set_version(version);
    let welcome = Welcome {
        version,
        max_frame,
        max_report_payload,
        features,
        ping_interval_secs: 1,
        relay_version: "fake".into(),
    };
    if conn
        .write_message(&Message::Welcome(welcome))
        .await
        .is_err()
    {
        return;
    }
    loop {
        let message = tokio::select! {
            _ = hang_up.changed() => return,
            read = conn.read_message() => match read {
                Ok(Some(message)) => message,
                _ => return,
            },
        };
        let reply = match message {
            Message::Report(report) => {
                {
                    let mut seen = seen.lock().unwrap();
                    seen.reports.push((number, report.id));
                    seen.bodies.push((*report).clone());
                }
                let answer = answer.lock().unwrap().clone();
                answer(&report)
            }
            Message::Ping(n) => Reply::Answer(Message::Pong(n)),
            _ => continue,
        };
        match reply {
            Reply::Answer(message) => {
                if conn.write_message(&message).await.is_err() {
                    return;
                }
            }
            Reply::Close => return,
            Reply::Silence => {}
        }
    }
}

pub fn ack(report: &Report) -> Reply {
    Reply::Answer(Message::Ack(Ack {
        id: report.id,
        status: AckStatus::Delivered,
    }))
}

pub fn nack(report: &Report, reason: NackReason) -> Reply {
    Reply::Answer(Message::Nack(Nack {
        id: report.id,
        reason,
        detail: "refused by the fake relay".into(),
        retry_after_ms: 0,
    }))
}

pub fn error(code: ErrorCode) -> Reply {
    Reply::Answer(Message::error(code, "refused by the fake relay"))
}
