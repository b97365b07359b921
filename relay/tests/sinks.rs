//! The HTTP(S) and Redis sinks against real servers: a TLS HTTP server written here, and a
//! real redis-server started by the test on a loopback port.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use guestwatch_protocol::{ChangeCounts, Trigger, TriggerKind};
use guestwatch_relay::{
    identity::IdentitySource,
    sink::{Claims, Delivery, Sink, SinkError, SinkOptions},
};
use guestwatch_testkit::{RedisServer, in_ci};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;

fn delivery(vm: &str, generation: u64, hash: &str) -> Delivery {
    Delivery {
        vm: vm.to_owned(),
        identity: IdentitySource::Hybrid {
            socket: PathBuf::from("/run/vm.sock_919"),
        },
        report_id: format!("00000000000000aa-{generation}"),
        content_hash: hash.to_owned(),
        trigger: Trigger::new(TriggerKind::Transaction),
        transactions: Vec::new(),
        tampers: Vec::new(),
        coalesced: vec![(TriggerKind::Transaction, 1)],
        changes: ChangeCounts::default(),
        claims: Claims::default(),
        scanned_at: Some(SystemTime::now()),
        received_at: SystemTime::now(),
        package_count: 1,
        report: bytes::Bytes::from_static(br#"{"packages":{},"success":true}"#),
        document: None,
        inventory: None,
        delta: None,
    }
}

/// What the test HTTP server saw: (idempotency key, authorization, body) per request.
type Seen = Arc<Mutex<Vec<(String, String, serde_json::Value)>>>;

/// A TLS HTTP server with a self-signed certificate for 127.0.0.1; `status` decides the answer.
async fn https_server(status: Arc<Mutex<u16>>) -> (SocketAddr, PathBuf, Seen, tempfile::TempDir) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, cert.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let seen_server = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let seen = seen_server.clone();
            let status = status.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    let status = status.clone();
                    async move {
                        let header = |name: &str| {
                            req.headers()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned()
                        };
                        let (key, auth) = (header("idempotency-key"), header("authorization"));
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let code = *status.lock().unwrap();
                        if code == 200 {
                            seen.lock().unwrap().push((
                                key,
                                auth,
                                serde_json::from_slice(&body).unwrap(),
                            ));
                        }
                        let mut response = Response::new(Full::new(Bytes::from_static(b"")));
                        *response.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
                        if code == 503 {
                            response
                                .headers_mut()
                                .insert("Retry-After", "7".parse().unwrap());
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, ca_path, seen, dir)
}

#[tokio::test]
async fn https_sink_posts_with_token_and_idempotency_key_and_reports_outages() {
    let status = Arc::new(Mutex::new(200));
    let (addr, ca, seen, _dir) = https_server(status.clone()).await;
    let url = format!("https://127.0.0.1:{}/reports", addr.port());

    // Without our CA the server's certificate is refused.
    let untrusting = Sink::open(&url, &SinkOptions::defaults()).await.unwrap();
    assert!(matches!(
        untrusting
            .deliver(&delivery("vm1", 1, "aa"), &Default::default())
            .await,
        Err(SinkError::Http(_))
    ));

    let options = SinkOptions {
        ca_file: Some(ca),
        bearer_token: Some("s3cret".into()),
        ..SinkOptions::defaults()
    };
    let sink = Sink::open(&url, &options).await.unwrap();
    let written = sink
        .deliver(&delivery("vm1", 1, "aa"), &Default::default())
        .await
        .unwrap();
    sink.deliver(&delivery("vm1", 1, "aa"), &Default::default())
        .await
        .unwrap();
    // A clone of vm1's image, with the same epoch and so the same report id.
    sink.deliver(&delivery("vm1-clone", 1, "aa"), &Default::default())
        .await
        .unwrap();
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0].0, "vm1/00000000000000aa-1");
        assert_eq!(
            seen[0].0, seen[1].0,
            "a retransmission carries the same idempotency key"
        );
        assert_eq!(
            seen[2].0, "vm1-clone/00000000000000aa-1",
            "clones sharing an epoch never share a key"
        );
        assert_eq!(seen[0].2["delivery"]["idempotency_key"], seen[0].0.as_str());
        assert_eq!(
            written,
            serde_json::to_vec(&seen[0].2).unwrap().len() as u64 + 1,
            "the bytes charged are the body's (serde_json's compact form plus the newline)"
        );
        assert_eq!(seen[0].1, "Bearer s3cret");
        assert_eq!(seen[0].2["report"]["success"], true);
        assert_eq!(seen[0].2["delivery"]["vm"], "vm1");
    }
    *status.lock().unwrap() = 503;
    match sink
        .deliver(&delivery("vm1", 2, "bb"), &Default::default())
        .await
    {
        Err(e @ SinkError::HttpStatus { status: 503, .. }) => {
            assert_eq!(e.retry_after(), Some(Duration::from_secs(7)))
        }
        other => panic!("unexpected {other:?}"),
    }
    *status.lock().unwrap() = 200;
    sink.deliver(&delivery("vm1", 2, "bb"), &Default::default())
        .await
        .unwrap();
    assert_eq!(seen.lock().unwrap().len(), 4);
}

/// `--http-body`: the change event with the full report (default), the report alone, or
/// the event alone.
#[tokio::test]
async fn http_bodies_carry_the_change_the_report_or_both() {
    use guestwatch_relay::sink::{
        HttpBody,
        event::{Changes, EventBase},
    };
    use report::changes::{ChangeClass, PackageChange};
    let status = Arc::new(Mutex::new(200));
    let (addr, ca, seen, _dir) = https_server(status).await;
    let url = format!("https://127.0.0.1:{}/reports", addr.port());
    let changes = Changes {
        base: Some(EventBase {
            report_id: "00000000000000aa-1".into(),
            content_hash: "aa".into(),
        }),
        list: Some(vec![PackageChange {
            class: ChangeClass::Upgraded,
            name: "openssl".into(),
            arch: "x86_64".into(),
            from: Some("1:3.0.7-24.el9".into()),
            to: Some("1:3.0.7-27.el9".into()),
        }]),
    };
    for (generation, body) in [
        (2, HttpBody::Both),
        (3, HttpBody::Full),
        (4, HttpBody::Change),
    ] {
        let options = SinkOptions {
            ca_file: Some(ca.clone()),
            http_body: body,
            ..SinkOptions::defaults()
        };
        let sink = Sink::open(&url, &options).await.unwrap();
        sink.deliver(&delivery("vm1", generation, "bb"), &changes)
            .await
            .unwrap();
    }
    let seen = seen.lock().unwrap();
    let bodies: Vec<&serde_json::Value> = seen.iter().map(|(_, _, b)| b).collect();
    let keys = |b: &serde_json::Value| {
        let mut k: Vec<String> = b.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(bodies[0]), ["change", "delivery", "report"]);
    assert_eq!(bodies[0]["change"]["changes"][0]["class"], "upgraded");
    assert_eq!(bodies[0]["change"]["changes"][0]["to"], "1:3.0.7-27.el9");
    assert_eq!(
        bodies[0]["change"]["base"]["report_id"],
        "00000000000000aa-1"
    );
    assert_eq!(bodies[0]["report"]["success"], true);
    assert_eq!(keys(bodies[1]), ["delivery", "report"]);
    let event = bodies[2];
    assert_eq!(event["report_id"], "00000000000000aa-4");
    assert_eq!(event["idempotency_key"], "vm1/00000000000000aa-4");
    assert_eq!(event["counts"]["upgraded"], 1);
    assert!(event.get("report").is_none(), "the event alone: {event}");
    // The idempotency key is the same whatever the body.
    assert_eq!(seen[2].0, "vm1/00000000000000aa-4");
}

fn redis_or_skip() -> Option<RedisServer> {
    match RedisServer::start() {
        Ok(server) => Some(server),
        Err(e) if !in_ci() => {
            eprintln!("SKIPPED: {e}");
            None
        }
        Err(e) => panic!("CI must run the Redis tests: {e}"),
    }
}

#[tokio::test]
async fn redis_sink_streams_keeps_latest_and_survives_an_outage() {
    let Some(mut redis) = redis_or_skip() else {
        return;
    };
    let options = SinkOptions {
        redis_stream: "gw:test".into(),
        redis_prefix: "gwt".into(),
        ..SinkOptions::defaults()
    };
    let sink = Sink::open(&redis.url(), &options).await.unwrap();
    assert_eq!(sink.latest_hash("vm1").await.unwrap(), None);
    assert!(
        sink.deliver(&delivery("vm1", 1, "aa"), &Default::default())
            .await
            .unwrap()
            > 0
    );
    sink.deliver(&delivery("vm2", 1, "cc"), &Default::default())
        .await
        .unwrap();
    let entries = redis.command("XRANGE gw:test - +").unwrap();
    assert!(
        entries.contains("vm1/00000000000000aa-1") && entries.contains("vm2/00000000000000aa-1"),
        "the stream entries carry the VM-qualified idempotency key: {entries}"
    );
    assert_eq!(
        sink.latest_hash("vm1").await.unwrap().as_deref(),
        Some("aa")
    );
    assert!(redis.command("XLEN gw:test").unwrap().starts_with(":2"));
    let ttl = redis.command("TTL gwt:latest:vm1").unwrap();
    assert!(
        ttl.trim_start_matches(':').trim().parse::<i64>().unwrap() > 0,
        "{ttl}"
    );

    // Redis goes away: deliveries fail (and the relay will retry); then it comes back empty.
    redis.stop();
    assert!(matches!(
        sink.deliver(&delivery("vm1", 2, "bb"), &Default::default())
            .await,
        Err(SinkError::Redis(_))
    ));
    redis.restart().unwrap();
    let mut delivered = false;
    for _ in 0..50 {
        if sink
            .deliver(&delivery("vm1", 2, "bb"), &Default::default())
            .await
            .is_ok()
        {
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(delivered, "the sink reconnects after the outage");
    assert_eq!(
        sink.latest_hash("vm1").await.unwrap().as_deref(),
        Some("bb")
    );
    let entries = redis.command("XRANGE gw:test - +").unwrap();
    assert!(entries.contains("00000000000000aa-2"), "{entries}");
}
