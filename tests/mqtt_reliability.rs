//! Fault injection on the publish stage with real processes: a real mosquitto that is stopped and restarted, the
//! real daemon killed with SIGKILL, and mosquitto's TLS listener with certificates made here by `openssl`.
//!
//! 1. Broker down for 30 s while a looping video plays: every emotion message arrives exactly once, in order.
//! 3. Daemon SIGKILLed while the broker is down, restarted, broker back: the spooled messages arrive.
//! 5. MQTT over TLS with a CA, a server and a client certificate; a wrong CA (and a plaintext listener) is a clear
//!    error, never a plaintext fallback; the password never appears in the log.
//!
//! The test subscriber keeps a persistent session (clean_session = false) on a broker with persistence, so
//! messages the daemon replays before the subscriber is back are queued for it by the broker.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use emotiond::pipeline::messages::FrameResult;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A mosquitto with persistence (so a stopped broker keeps the test subscriber's session and queue).
fn persistent_broker(state: &Path) -> Mosquitto {
    // mosquitto started as root drops to its own user: it must be able to write its database here.
    open_up(state, 0o777);
    let port = free_port();
    Mosquitto::start_conf(
        port,
        &format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
             max_queued_messages 0\nmax_inflight_messages 0\n",
            state.display()
        ),
    )
}

/// Resident memory of a process, KiB (0 if unknown).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Test files only: let mosquitto (which drops root for its own user) read and write them.
fn open_up(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// One emotion message as the subscriber saw it.
#[derive(Debug, Clone)]
struct Got {
    frame: FrameResult,
    /// The broker re-delivered it to the subscriber (its DUP flag): not the daemon's doing.
    dup: bool,
}

/// A subscriber with a persistent session: it reconnects by itself and the broker queues for it while it is away.
struct DurableSubscriber {
    rx: mpsc::Receiver<Got>,
    got: Vec<Got>,
    statuses: Vec<(String, String)>,
    status_rx: mpsc::Receiver<(String, String)>,
}

impl DurableSubscriber {
    fn connect(port: u16) -> Self {
        use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
        let id = format!("durable-sub-{}-{}", std::process::id(), free_port());
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_clean_session(false);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut conn) = Client::new(opts, 1000);
        let (tx, rx) = mpsc::channel();
        let (status_tx, status_rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        // Harmless when the session was kept; needed when it was not.
                        let _ = client.try_subscribe("emotiond/#", QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let payload = String::from_utf8_lossy(&p.payload).into_owned();
                        if p.topic.ends_with("/emotions") {
                            let frame: FrameResult = serde_json::from_str(&payload)
                                .unwrap_or_else(|e| panic!("bad message {payload}: {e}"));
                            if tx.send(Got { frame, dup: p.dup }).is_err() {
                                return;
                            }
                        } else {
                            let _ = status_tx.send((p.topic.clone(), payload));
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("subscription acknowledged");
        Self {
            rx,
            got: Vec::new(),
            statuses: Vec::new(),
            status_rx,
        }
    }

    fn drain(&mut self) {
        while let Ok(g) = self.rx.try_recv() {
            self.got.push(g);
        }
        while let Ok(s) = self.status_rx.try_recv() {
            self.statuses.push(s);
        }
    }

    fn wait_until(&mut self, timeout: Duration, done: impl Fn(&[Got]) -> bool) -> bool {
        let until = Instant::now() + timeout;
        loop {
            self.drain();
            if done(&self.got) {
                return true;
            }
            if Instant::now() > until {
                return false;
            }
            if let Ok(g) = self.rx.recv_timeout(Duration::from_millis(100)) {
                self.got.push(g);
            }
        }
    }
}

/// Splits messages into daemon runs (the sequence restarts at 1 with each run) and checks each run is complete
/// and in order: seq goes up by exactly one. Returns the runs' (first, last) seqs and the duplicates.
fn check_runs(got: &[Got]) -> (Vec<(u64, u64)>, usize) {
    let mut seen = HashSet::new();
    let mut dups = 0;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for g in got {
        let f = &g.frame;
        check_message(f);
        if !seen.insert((f.camera.clone(), f.seq, f.ts_ms)) {
            dups += 1;
            assert!(
                g.dup,
                "a duplicate the broker did not flag as a re-delivery: seq {}",
                f.seq
            );
            continue;
        }
        match runs.last_mut() {
            Some((_, last)) if f.seq == *last + 1 => *last = f.seq,
            Some((_, last)) if f.seq <= 2 && f.seq < *last => runs.push((f.seq, f.seq)),
            None => runs.push((f.seq, f.seq)),
            Some((first, last)) => panic!(
                "out of order or missing: seq {} after {last} (run started at {first})",
                f.seq
            ),
        }
    }
    (runs, dups)
}

fn reliability_config(port: u16, spool: &Path, node: &str) -> TestConfig {
    write_config(&format!(
        "[node]\nid = \"{node}\"\n[mqtt]\nbroker = \"mqtt://127.0.0.1:{port}\"\nqos = 1\npublish_empty = true\n\
         spool_dir = \"{}\"\n{}",
        spool.display(),
        // Every frame at 5 fps: a steady, countable stream without loading the 2 CI cores.
        camera("cam", SAMPLE, true, true, 5.0)
    ))
}

/// Test 1: the broker is stopped for 30 s while the video plays and restarted on the same port.
#[test]
fn broker_outage_every_message_exactly_once_in_order() {
    let state = tempfile::tempdir().unwrap();
    let mut broker = persistent_broker(state.path());
    let mut sub = DurableSubscriber::connect(broker.port);
    let spool = tempfile::tempdir().unwrap();
    let cfg = reliability_config(broker.port, spool.path(), "outage");
    let mut daemon = Daemon::start(&cfg.path);

    assert!(
        sub.wait_until(Duration::from_secs(60), |g| g.len() >= 15),
        "no messages before the outage"
    );
    let stopped_at = now_ms();
    broker.stop();
    let rss_before = rss_kib(daemon.child.id());
    std::thread::sleep(Duration::from_secs(30));
    assert!(
        daemon.is_running(),
        "the daemon must ride out a broker outage"
    );
    let rss_after = rss_kib(daemon.child.id());
    let restarted_at = now_ms();
    broker.restart();
    // Wait for frames captured well after the restart: the spool has been replayed by then.
    let caught_up = sub.wait_until(Duration::from_secs(60), |g| {
        g.iter().any(|g| g.frame.ts_ms > restarted_at + 5000)
    });
    let (status, log) = daemon.stop();
    assert!(caught_up, "messages stopped after the restart; log:\n{log}");
    assert!(status.success(), "{log}");
    sub.wait_until(Duration::from_secs(2), |_| false);

    let (runs, dups) = check_runs(&sub.got);
    let before = sub
        .got
        .iter()
        .filter(|g| g.frame.ts_ms < stopped_at)
        .count();
    let during = sub
        .got
        .iter()
        .filter(|g| (stopped_at..restarted_at).contains(&g.frame.ts_ms))
        .count();
    let after = sub.got.len() - before - during;
    eprintln!(
        "outage test: {} messages (before {before}, during the 30 s outage {during}, after {after}), runs {runs:?}, \
         broker re-deliveries {dups}; daemon RSS {rss_before} KiB when the outage began, {rss_after} KiB at its end",
        sub.got.len()
    );
    assert_eq!(
        runs.len(),
        1,
        "the camera pipeline did not restart, so one run: {runs:?}"
    );
    assert_eq!(runs[0].0, 1, "the first message is seq 1");
    // 30 s at 5 fps is 150 frames; allow for a slow CI machine.
    assert!(
        during >= 60,
        "only {during} messages from the outage arrived"
    );
    assert!(
        before >= 10 && after >= 10,
        "before {before}, after {after}"
    );
    assert!(
        log.contains("Lost the MQTT broker") && log.contains("Reconnected"),
        "{log}"
    );
    assert!(
        !log.contains("Results dropped") && !log.contains("oldest undelivered"),
        "nothing may be dropped: {log}"
    );
}

/// Test 3: the daemon is SIGKILLed while the broker is down; a new daemon and then the broker come back.
#[test]
fn sigkill_while_broker_down_spool_is_delivered_after_restart() {
    let state = tempfile::tempdir().unwrap();
    let mut broker = persistent_broker(state.path());
    let mut sub = DurableSubscriber::connect(broker.port);
    let spool = tempfile::tempdir().unwrap();
    let cfg = reliability_config(broker.port, spool.path(), "crash");
    let mut first = Daemon::start(&cfg.path);
    assert!(
        sub.wait_until(Duration::from_secs(60), |g| g.len() >= 5),
        "no messages before the outage"
    );
    let stopped_at = now_ms();
    broker.stop();
    std::thread::sleep(Duration::from_secs(8));
    assert!(first.is_running());
    let killed_at = now_ms();
    first.child.kill().unwrap(); // SIGKILL: no shutdown code runs
    let (_, log1) = first.wait(Duration::from_secs(10));

    let second = Daemon::start(&cfg.path);
    std::thread::sleep(Duration::from_secs(4));
    let broker_back = now_ms();
    broker.restart();
    let caught_up = sub.wait_until(Duration::from_secs(60), |g| {
        g.iter()
            .any(|g| g.frame.seq < 50 && g.frame.ts_ms > broker_back + 3000)
    });
    let (status, log2) = second.stop();
    assert!(caught_up, "first run:\n{log1}\nsecond run:\n{log2}");
    assert!(status.success(), "{log2}");
    sub.wait_until(Duration::from_secs(2), |_| false);

    let (runs, dups) = check_runs(&sub.got);
    assert_eq!(runs.len(), 2, "two daemon runs: {runs:?}");
    // Split by run: the second run's messages start where seq goes back to 1.
    let split = sub
        .got
        .iter()
        .position(|g| g.frame.seq == runs[1].0 && g.frame.ts_ms > stopped_at)
        .unwrap();
    let (run1, run2) = sub.got.split_at(split);
    let spooled1 = run1.iter().filter(|g| g.frame.ts_ms >= stopped_at).count();
    let last1 = run1.last().unwrap().frame.ts_ms;
    let spooled2 = run2.iter().filter(|g| g.frame.ts_ms < broker_back).count();
    eprintln!(
        "crash test: run 1 seq {:?} ({spooled1} spooled during the outage, last one {} ms before the SIGKILL); run 2 \
         seq {:?} ({spooled2} spooled before the broker came back); broker re-deliveries {dups}",
        runs[0],
        killed_at as i64 - last1 as i64,
        runs[1]
    );
    // 8 s at 5 fps ≈ 40 frames captured while the broker was down, all of which were spooled.
    assert!(
        spooled1 >= 20,
        "only {spooled1} of the first run's outage messages arrived\n{log2}"
    );
    // Nothing written before the kill is lost: at most the frame being processed at that instant is missing.
    assert!(
        killed_at.saturating_sub(last1) < 1500,
        "the first run's last message is {} ms older than the kill",
        killed_at - last1
    );
    assert!(
        spooled2 >= 5,
        "the second run's spooled messages: {spooled2}"
    );
    assert!(log2.contains("from an earlier run"), "{log2}");
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with the openssl CLI.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("openssl is installed");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for ca in ["ca", "wrong-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-days",
                "2",
                "-subj",
                &format!("/CN=emotiond test {ca}"),
            ]);
        }
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for who in ["server", "client"] {
            run(&[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{who}.key"),
                "-out",
                &format!("{who}.csr"),
                "-subj",
                &format!("/CN={who}"),
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{who}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{who}.ext"),
            ]);
        }
        // mosquitto drops root for its own user before it reads its certificate and key.
        open_up(d, 0o755);
        for name in ["ca.pem", "server.pem", "server.key"] {
            open_up(&d.join(name), 0o644);
        }
        Self { dir }
    }
}

const PASSWORD: &str = "s3cr3t-Hunter2-pw";

/// Test 5: TLS with a CA, server and client certificates; a wrong CA and a plaintext listener are clear errors.
#[test]
fn tls_with_client_certificate_and_no_plaintext_fallback() {
    let pki = Pki::new();
    let (tls_port, plain_port) = (free_port(), free_port());
    let passwd = pki.dir.path().join("passwd");
    let ok = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwd)
        .args(["camera", PASSWORD])
        .status()
        .expect("mosquitto_passwd is installed with mosquitto");
    assert!(ok.success());
    open_up(&passwd, 0o644);
    // TLS listener with client certificates required; a plaintext listener for the test subscriber. A client that
    // gives a user name must give its password (password_file); the anonymous subscriber is let in.
    let _broker = Mosquitto::start_conf(
        tls_port,
        &format!(
            "per_listener_settings false\nallow_anonymous true\npassword_file {}\n\
             listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n\
             listener {plain_port} 127.0.0.1\n",
            passwd.display(),
            pki.path("ca.pem"),
            pki.path("server.pem"),
            pki.path("server.key"),
        ),
    );
    assert!(wait_for_port(plain_port, Duration::from_secs(10)));
    let mut sub = Subscriber::connect(plain_port);

    let config = |node: &str, url: &str, ca: &str, spool: &Path| {
        write_config(&format!(
            "[node]\nid = \"{node}\"\n[mqtt]\nbroker = \"{url}\"\nusername = \"camera\"\npassword = \"{PASSWORD}\"\n\
             publish_empty = true\nspool_dir = \"{}\"\n[mqtt.tls]\nca_file = \"{ca}\"\nclient_cert = \"{}\"\n\
             client_key = \"{}\"\n{}",
            spool.display(),
            pki.path("client.pem"),
            pki.path("client.key"),
            camera("cam", SAMPLE, true, true, 5.0)
        ))
    };
    let spools = tempfile::tempdir().unwrap();
    let debug = [("RUST_LOG", "debug")];
    // The right CA, and (at the same time) a wrong CA and a TLS client pointed at the plaintext listener.
    let good_cfg = config(
        "tlsgood",
        &format!("mqtts://127.0.0.1:{tls_port}"),
        &pki.path("ca.pem"),
        &spools.path().join("good"),
    );
    let wrong_cfg = config(
        "tlswrong",
        &format!("mqtts://127.0.0.1:{tls_port}"),
        &pki.path("wrong-ca.pem"),
        &spools.path().join("wrong"),
    );
    let plain_cfg = config(
        "tlsplain",
        &format!("mqtts://127.0.0.1:{plain_port}"),
        &pki.path("ca.pem"),
        &spools.path().join("plain"),
    );
    let good = Daemon::start_with(&good_cfg.path, &debug);
    let wrong = Daemon::start_with(&wrong_cfg.path, &debug);
    let plain = Daemon::start_with(&plain_cfg.path, &debug);
    let got = sub.collect_until(Duration::from_secs(60), |m| {
        m.iter()
            .filter(|m| m.topic == "emotiond/tlsgood/cam/emotions")
            .count()
            >= 5
    });
    // Give the misconfigured ones the same time to (not) get through.
    std::thread::sleep(Duration::from_secs(2));
    let (s1, log_good) = good.stop();
    let (s2, log_wrong) = wrong.stop();
    let (s3, log_plain) = plain.stop();
    assert!(got, "nothing arrived over TLS:\n{log_good}");
    assert!(s1.success() && s2.success() && s3.success());
    assert!(
        log_good.contains("Connected to the MQTT broker"),
        "{log_good}"
    );
    for f in sub.emotions() {
        check_message(&f);
    }
    for node in ["tlswrong", "tlsplain"] {
        assert!(
            !sub.received
                .iter()
                .any(|m| m.topic.starts_with(&format!("emotiond/{node}/"))),
            "{node} must not get through: {:?}",
            sub.received.iter().map(|m| &m.topic).collect::<Vec<_>>()
        );
    }
    for (name, log) in [("wrong CA", &log_wrong), ("plaintext listener", &log_plain)] {
        for line in log.lines().filter(|l| l.contains("ERROR")) {
            eprintln!("{name}: {line}");
        }
    }
    let broker_name = format!("127.0.0.1:{tls_port}");
    assert!(
        log_wrong.contains("ERROR")
            && log_wrong.contains(&broker_name)
            && log_wrong.contains("certificate"),
        "a wrong CA must be a clear error naming the broker and the certificate:\n{log_wrong}"
    );
    assert!(
        log_plain.contains(&format!("127.0.0.1:{plain_port}"))
            && !log_plain.contains("Connected to the MQTT broker"),
        "{log_plain}"
    );
    // The undelivered messages stay in the spool for when the operator fixes the CA.
    assert!(
        log_wrong.contains("undelivered messages in the spool"),
        "{log_wrong}"
    );
    for log in [&log_good, &log_wrong, &log_plain] {
        assert!(
            !log.contains(PASSWORD),
            "the password leaked into the log:\n{log}"
        );
    }
    let (code, out, err) = run_cli(
        &["validate", "--config", &good_cfg.path.display().to_string()],
        &[],
    );
    assert!(
        !out.contains(PASSWORD) && !err.contains(PASSWORD),
        "{out}{err}"
    );
    let _ = code;
}

/// `emotiond validate` explains TLS mistakes before anything starts.
#[test]
fn validate_rejects_tls_mistakes() {
    let cfg = write_config(&format!(
        "[mqtt]\nbroker = \"mqtts://broker.example:8883\"\n{}",
        camera("cam", SAMPLE, true, false, 0.0)
    ));
    let (code, _, err) = run_cli(
        &["validate", "--config", &cfg.path.display().to_string()],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("mqtt.tls.ca_file"), "{err}");
    let cfg = write_config(&format!(
        "[mqtt]\nbroker = \"mqtt://broker.example\"\n[mqtt.tls]\nca_file = \"/nonexistent/ca.pem\"\n\
         client_key = \"/nonexistent/k.pem\"\n{}",
        camera("cam", SAMPLE, true, false, 0.0)
    ));
    let (code, _, err) = run_cli(
        &["validate", "--config", &cfg.path.display().to_string()],
        &[],
    );
    assert_ne!(code, 0);
    for needle in ["plaintext", "/nonexistent/ca.pem", "client_cert"] {
        assert!(err.contains(needle), "missing {needle}: {err}");
    }
}

/// The spool's bound end to end: a small spool during an outage keeps the newest messages, drops the oldest, and
/// says how many.
#[test]
fn full_spool_drops_the_oldest_and_counts_them() {
    let state = tempfile::tempdir().unwrap();
    let mut broker = persistent_broker(state.path());
    let mut sub = DurableSubscriber::connect(broker.port);
    broker.stop();
    let spool = tempfile::tempdir().unwrap();
    // 64 KiB (the smallest allowed) holds ~90 messages; every frame at 24 fps overflows it in a few seconds.
    let cfg = write_config(&format!(
        "[node]\nid = \"small\"\n[mqtt]\nbroker = \"mqtt://127.0.0.1:{}\"\npublish_empty = true\n\
         spool_max_bytes = 65536\nspool_dir = \"{}\"\n{}",
        broker.port,
        spool.path().display(),
        camera("cam", SAMPLE, true, true, 0.0)
    ));
    let daemon = Daemon::start(&cfg.path);
    std::thread::sleep(Duration::from_secs(14));
    broker.restart();
    let restarted_at = now_ms();
    let caught_up = sub.wait_until(Duration::from_secs(60), |g| {
        g.iter().any(|g| g.frame.ts_ms > restarted_at + 2000)
    });
    let (status, log) = daemon.stop();
    assert!(caught_up && status.success(), "{log}");
    sub.wait_until(Duration::from_secs(2), |_| false);
    let (runs, _) = check_runs(&sub.got);
    assert_eq!(runs.len(), 1, "{runs:?}");
    let first = runs[0].0;
    // "… the N oldest undelivered messages were dropped." — logged at most every 10 s, so add them up.
    let logged: u64 = log
        .match_indices(" oldest undelivered messages were dropped")
        .map(|(i, _)| {
            let head = &log[..i];
            head[head.rfind("the ").unwrap() + 4..]
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    eprintln!(
        "full spool: first seq delivered {first} (the {} before it dropped; the log counted {logged}), last {}",
        first - 1,
        runs[0].1
    );
    assert!(
        first > 50,
        "the oldest messages should have been dropped: {runs:?}"
    );
    assert_eq!(logged, first - 1, "every dropped message is counted\n{log}");
}
