//! Test harness: a real mosquitto on a free port, a real MQTT subscriber, and the real `emotiond` binary.
#![allow(dead_code)]

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use emotiond::pipeline::messages::FrameResult;
use opencv::core::{Mat, Scalar, Vector};
use opencv::prelude::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_emotiond");
pub const SAMPLE: &str = "media/sample.mp4";
pub const FER_LABELS: [&str; 7] = emotiond::model::FER_LABELS;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn mosquitto_bin() -> PathBuf {
    for p in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ] {
        if Path::new(p).is_file() {
            return p.into();
        }
    }
    panic!("mosquitto is not installed: run `make deps` (deploy/install-deps.sh)");
}

/// A real mosquitto broker on 127.0.0.1:`port`, killed on drop.
pub struct Mosquitto {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        assert!(
            wait_for_port(port, Duration::from_secs(10)),
            "mosquitto did not listen on {port}"
        );
        Self {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Mosquitto {
    /// A mosquitto whose whole config file is `conf` (listeners included); waits until `port` accepts.
    pub fn start_conf(port: u16, conf: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mosquitto.conf"), conf).unwrap();
        let mut m = Self {
            child: Self::spawn(&dir.path().join("mosquitto.conf")),
            port,
            _dir: dir,
        };
        m.wait_listening();
        m
    }

    fn spawn(conf: &Path) -> Child {
        Command::new(mosquitto_bin())
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto")
    }

    fn wait_listening(&mut self) {
        assert!(
            wait_for_port(self.port, Duration::from_secs(10)),
            "mosquitto did not listen on {}",
            self.port
        );
    }

    /// Stops the broker the way `systemctl stop` does (SIGTERM) and waits until it has exited.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let until = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > until {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the broker again on the same port with the same config file.
    pub fn restart(&mut self) {
        self.child = Self::spawn(&self._dir.path().join("mosquitto.conf"));
        self.wait_listening();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One received MQTT message.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: String,
    pub retain: bool,
    /// Wall-clock arrival time, milliseconds since the Unix epoch (comparable with a message's `ts_ms`).
    pub at_ms: u64,
}

/// A real MQTT subscriber (rumqttc's blocking client) on `emotiond/#`.
pub struct Subscriber {
    rx: mpsc::Receiver<Msg>,
    pub received: Vec<Msg>,
}

impl Subscriber {
    /// Connects and returns once the subscription is acknowledged.
    pub fn connect(port: u16) -> Self {
        use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
        let id = format!("test-sub-{}-{}", std::process::id(), free_port());
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(10));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut conn) = Client::new(opts, 1000);
        client.subscribe("emotiond/#", QoS::AtLeastOnce).unwrap();
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _client = client; // keeps the request channel open
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let msg = Msg {
                            topic: p.topic.clone(),
                            payload: String::from_utf8_lossy(&p.payload).into_owned(),
                            retain: p.retain,
                            at_ms: std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .unwrap()
                                .as_millis() as u64,
                        };
                        if tx.send(msg).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("subscription acknowledged");
        Self {
            rx,
            received: Vec::new(),
        }
    }

    /// Collects messages until `done(&all so far)` holds or `timeout` passes; returns whether `done` held.
    pub fn collect_until(&mut self, timeout: Duration, done: impl Fn(&[Msg]) -> bool) -> bool {
        let until = Instant::now() + timeout;
        loop {
            if done(&self.received) {
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(m) => self.received.push(m),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return done(&self.received),
            }
        }
    }

    pub fn emotions(&self) -> Vec<FrameResult> {
        self.received
            .iter()
            .filter(|m| m.topic.ends_with("/emotions"))
            .map(|m| {
                serde_json::from_str(&m.payload)
                    .unwrap_or_else(|e| panic!("bad message {}: {e}", m.payload))
            })
            .collect()
    }

    /// Payloads of the node's retained status topic `emotiond/<node>/status`, in arrival order.
    pub fn statuses(&self) -> Vec<String> {
        self.received
            .iter()
            .filter(|m| m.topic.ends_with("/status") && m.topic.split('/').count() == 3)
            .map(|m| m.payload.clone())
            .collect()
    }

    /// Payloads of a camera's retained status topic `emotiond/<node>/<camera>/status`.
    pub fn camera_statuses(&self, camera: &str) -> Vec<String> {
        self.received
            .iter()
            .filter(|m| m.topic.ends_with(&format!("/{camera}/status")))
            .map(|m| m.payload.clone())
            .collect()
    }
}

/// A config file in a temp dir.
pub struct TestConfig {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

pub fn write_config(text: &str) -> TestConfig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("emotiond.toml");
    std::fs::write(&path, text).unwrap();
    TestConfig { dir, path }
}

/// `[mqtt]` for an external broker on `port`.
pub fn mqtt_external(port: u16) -> String {
    // Tests run daemons with the same node id side by side: each gets its own spool directory.
    let spool = std::env::temp_dir().join(format!(
        "emotiond-test-spool-{}-{port}-{}",
        std::process::id(),
        free_port()
    ));
    format!(
        "[node]\nid = \"testnode\"\n[mqtt]\nbroker = \"mqtt://127.0.0.1:{port}\"\nqos = 1\nspool_dir = \"{}\"\n",
        spool.display()
    )
}

/// A camera table.
pub fn camera(id: &str, uri: &str, realtime: bool, looping: bool, max_fps: f64) -> String {
    format!(
        "[[cameras]]\nid = \"{id}\"\nuri = \"{uri}\"\nrealtime = {realtime}\nloop = {looping}\nmax_fps = {max_fps}\n"
    )
}

/// The daemon as a child process with captured stderr.
pub struct Daemon {
    pub child: Child,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Daemon {
    pub fn start(config: &Path) -> Self {
        Self::start_with(config, &[])
    }

    pub fn start_with(config: &Path, envs: &[(&str, &str)]) -> Self {
        let mut child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            // Tests run daemons side by side: each gets its own metrics port unless the test chose one.
            .env(
                "EMOTIOND__METRICS__LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start emotiond");
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Self {
            child,
            stderr: Some(stderr),
        }
    }

    /// Like [`Daemon::start`], with extra environment variables (e.g. `RUST_LOG`, `EMOTIOND__…` overrides).
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for exit; returns the status and everything it logged.
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, String) {
        let until = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let log = self.stderr.take().unwrap().join().unwrap();
                return (status, log);
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                let log = self.stderr.take().unwrap().join().unwrap();
                panic!("emotiond did not exit within {timeout:?}; log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(self) -> (ExitStatus, String) {
        self.signal("TERM");
        self.wait(Duration::from_secs(20))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// Runs `emotiond ARGS` to completion.
pub fn run_cli(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("run emotiond");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The schema checks every published message must pass.
pub fn check_message(r: &FrameResult) {
    assert_eq!(r.schema, emotiond::pipeline::messages::SCHEMA_VERSION);
    assert!(
        r.ts.ends_with('Z') && r.ts_ms > 1_600_000_000_000,
        "timestamps {} {}",
        r.ts,
        r.ts_ms
    );
    assert!(r.frame.width > 0 && r.frame.height > 0);
    for f in &r.faces {
        let sum: f64 = f.probabilities.values().map(|v| v.as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() <= 1e-4, "probabilities sum to {sum}");
        assert_eq!(f.probabilities.len(), 7);
        for l in f.probabilities.keys() {
            assert!(FER_LABELS.contains(&l.as_str()), "unknown label {l}");
        }
        let best = f
            .probabilities
            .iter()
            .max_by(|a, b| a.1.as_f64().partial_cmp(&b.1.as_f64()).unwrap())
            .unwrap();
        assert_eq!(&f.label, best.0);
        assert!((f.confidence as f64 - best.1.as_f64().unwrap()).abs() < 1e-6);
        assert!((0.0..=1.0).contains(&f.score));
        let b = &f.bbox_norm;
        assert!(
            b.x >= 0.0 && b.y >= 0.0 && b.x + b.w <= 1.0 + 1e-4 && b.y + b.h <= 1.0 + 1e-4,
            "{b:?}"
        );
        assert!((f.bbox.w / r.frame.width as f32 - b.w).abs() < 1e-4);
    }
}

/// A plain HTTP GET on loopback; returns (status code, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics endpoint");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// Makes sure ort can find its library: ORT_DYLIB_PATH, else the pip wheel (what CI installs).
pub fn ort_library() {
    if std::env::var_os("ORT_DYLIB_PATH").is_some()
        || emotiond::model::resolve_library(None).is_ok()
    {
        return;
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import onnxruntime, os, glob; d = os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'); print(sorted(glob.glob(d + '/libonnxruntime.so*'))[-1])"])
        .output()
        .expect("python3 to locate onnxruntime");
    let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        Path::new(&p).is_file(),
        "ONNX Runtime library not found: set ORT_DYLIB_PATH"
    );
    // SAFETY: set once before any thread reads the environment (ort is initialised after this call).
    unsafe { std::env::set_var("ORT_DYLIB_PATH", p) };
}

// ---- a tiny generated image data set for the training tests (Kaggle layout, 48×48 grey PNGs)

/// Class `k`: concentric rings with frequency depending on `k` (invariant to flips and small rotations), plus
/// noise and a random centre offset, so the classes are learnable but not trivially identical images.
pub fn pattern(k: usize, i: usize) -> Mat {
    let mut state = ((k * 1000 + i) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rnd = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 10_000) as f32 / 10_000.0
    };
    let (cx, cy) = (24.0 + 4.0 * (rnd() - 0.5), 24.0 + 4.0 * (rnd() - 0.5));
    let freq = 0.25 + 0.22 * k as f32;
    let mut m =
        Mat::new_rows_cols_with_default(48, 48, opencv::core::CV_8UC1, Scalar::all(0.0)).unwrap();
    for y in 0..48 {
        for x in 0..48 {
            let r = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
            let v = 128.0 + 90.0 * (r * freq).sin() + 30.0 * (rnd() - 0.5);
            *m.at_2d_mut::<u8>(y, x).unwrap() = v.clamp(0.0, 255.0) as u8;
        }
    }
    m
}

pub fn make_dataset(root: &Path, train: usize, test: usize) {
    for (split, n) in [("train", train), ("test", test)] {
        for (k, class) in emotiond::model::FER_LABELS.iter().enumerate() {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let seed = if split == "train" { i } else { 10_000 + i };
                let path = dir.join(format!("{i}.png"));
                opencv::imgcodecs::imwrite(
                    path.to_str().unwrap(),
                    &pattern(k, seed),
                    &Vector::new(),
                )
                .unwrap();
            }
        }
    }
}

/// `train` on the tiny data set: Lite0 at 48 px, batch 16, peak lr 3e-3 after a half-epoch warm-up, no early
/// stop, quiet, no plots; `extra` adds or overrides flags.
#[cfg(feature = "train")]
pub fn tiny_train_args(data: &Path, out: &Path, extra: &[&str]) -> emotiond::train::TrainArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: emotiond::train::TrainArgs,
    }
    let mut v = vec![
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--arch",
        "lite0",
        "--input-size",
        "48",
        "--batch",
        "16",
        "--lr",
        "3e-3",
        "--warmup-epochs",
        "0.5",
        "--patience",
        "0",
        "--quiet",
        "--no-plots",
    ];
    v.extend(extra);
    Cli::parse_from(v).args
}
