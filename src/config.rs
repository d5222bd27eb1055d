//! Daemon configuration: one serde struct per stage.
//!
//! In: an optional TOML file (`--config`), then `EMOTIOND__SECTION__KEY` environment overrides (e.g.
//! `EMOTIOND__MQTT__BROKER=mqtt://10.0.0.5:1883`). Out: a [`Config`], or an error naming the file and key.
//! [`Config::validate`] checks every value and every file the config names without starting anything; it is
//! what `emotiond validate` (systemd `ExecStartPre`) runs. Relative paths are relative to the working directory.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::ExecutionProvider;

/// Prefix of environment overrides: `EMOTIOND__MQTT__BROKER` sets `mqtt.broker`.
pub const ENV_PREFIX: &str = "EMOTIOND";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Load {
        path: String,
        source: config::ConfigError,
    },
    #[error("configuration is invalid:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This host's identity in topics.
    pub node: NodeConfig,
    /// Logging.
    pub log: LogConfig,
    /// The cameras; each runs its own GStreamer pipeline and detection thread.
    pub cameras: Vec<CameraConfig>,
    /// Face detection and cropping.
    pub detect: DetectConfig,
    /// Emotion classification.
    pub classify: ClassifyConfig,
    /// Where results are published.
    pub mqtt: MqttConfig,
    /// Prometheus endpoint and the periodic stats message.
    pub metrics: MetricsConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`; empty disables the endpoint.
    pub listen: String,
    /// Seconds between stats messages on `<prefix>/<node>/stats`; 0 disables them.
    pub stats_interval_s: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9108".into(),
            stats_interval_s: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Node id used in topics `emotiond/<node>/...`; defaults to the host name.
    pub id: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        let host: String = host
            .trim()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .collect();
        Self {
            id: if host.is_empty() {
                "localhost".into()
            } else {
                host
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `human` or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `emotiond=debug,info`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CameraConfig {
    /// Camera id used in topics; letters, digits, `-` and `_`.
    pub id: String,
    /// `file://`, `rtsp://`, `http(s)://` URI, or a plain file path (made absolute).
    #[serde(default)]
    pub uri: Option<String>,
    /// A V4L2 device such as `/dev/video0`.
    #[serde(default)]
    pub device: Option<String>,
    /// A custom GStreamer pipeline that ends in `appsink name=sink`.
    #[serde(default)]
    pub pipeline: Option<String>,
    /// Process at most this many frames per second (0 = every frame; else 1/86400 to 1000).
    #[serde(default)]
    pub max_fps: f64,
    /// Restart files from the beginning at their end (demo loops).
    #[serde(default, rename = "loop")]
    pub looping: bool,
    /// `true`: behave like a live camera — files play at their own speed and frames that arrive while the
    /// previous one is processed are dropped. `false`: process every frame as fast as possible (batch jobs).
    #[serde(default = "yes")]
    pub realtime: bool,
    /// Restart the camera's pipeline when no frame has arrived for this many seconds (0 = never; at most 86400).
    #[serde(default = "default_stall")]
    pub stall_timeout_s: f64,
}

fn default_stall() -> f64 {
    10.0
}

fn yes() -> bool {
    true
}

/// Where a camera's frames come from, after validation.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceKind {
    Uri(String),
    Device(String),
    Pipeline(String),
}

impl CameraConfig {
    /// A camera reading a file or URI.
    pub fn from_uri(id: &str, uri: &str) -> Self {
        Self {
            id: id.into(),
            uri: Some(uri.into()),
            device: None,
            pipeline: None,
            max_fps: 0.0,
            looping: false,
            realtime: true,
            stall_timeout_s: default_stall(),
        }
    }

    /// The stall limit, if any.
    pub fn stall_timeout(&self) -> Option<Duration> {
        (self.stall_timeout_s > 0.0)
            .then(|| Duration::try_from_secs_f64(self.stall_timeout_s).ok())
            .flatten()
    }

    /// The source, with plain paths turned into absolute `file://` URIs.
    pub fn source(&self) -> Result<SourceKind, String> {
        match (&self.uri, &self.device, &self.pipeline) {
            (Some(uri), None, None) => {
                if uri.contains("://") {
                    let scheme = uri
                        .split("://")
                        .next()
                        .unwrap_or_default()
                        .to_ascii_lowercase();
                    const OK: &[&str] = &[
                        "file", "rtsp", "rtsps", "rtspt", "http", "https", "udp", "rtmp", "srt",
                    ];
                    if !OK.contains(&scheme.as_str()) {
                        return Err(format!(
                            "camera `{}`: URI scheme `{scheme}` is not supported (use file, rtsp, http(s), udp, rtmp or srt)",
                            self.id
                        ));
                    }
                    if scheme == "file" {
                        let path = &uri["file://".len()..];
                        if !Path::new(path).is_file() {
                            return Err(format!(
                                "camera `{}`: video file {path} does not exist",
                                self.id
                            ));
                        }
                    }
                    Ok(SourceKind::Uri(uri.clone()))
                } else {
                    let path = Path::new(uri);
                    let abs = std::path::absolute(path)
                        .map_err(|e| format!("camera `{}`: {uri}: {e}", self.id))?;
                    if !abs.is_file() {
                        return Err(format!(
                            "camera `{}`: video file {} does not exist (give a path or a URI such as rtsp://…)",
                            self.id,
                            abs.display()
                        ));
                    }
                    Ok(SourceKind::Uri(format!("file://{}", abs.display())))
                }
            }
            (None, Some(dev), None) => {
                if !Path::new(dev).exists() {
                    return Err(format!(
                        "camera `{}`: device {dev} does not exist (is the camera plugged in?)",
                        self.id
                    ));
                }
                Ok(SourceKind::Device(dev.clone()))
            }
            (None, None, Some(p)) => {
                if !p.contains("appsink") || !p.contains("name=sink") {
                    return Err(format!(
                        "camera `{}`: a custom pipeline must end in `appsink name=sink`",
                        self.id
                    ));
                }
                Ok(SourceKind::Pipeline(p.clone()))
            }
            _ => Err(format!(
                "camera `{}`: set exactly one of `uri`, `device` or `pipeline`",
                self.id
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectorBackend {
    /// YuNet (2023mar) run through ONNX Runtime: accurate, ~15 ms per 640×360 frame on one core.
    Yunet,
    /// OpenCV's Haar cascade: no model file needed, slower and less accurate.
    Haar,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    /// `yunet` or `haar`.
    pub backend: DetectorBackend,
    /// YuNet ONNX model.
    pub yunet_model: PathBuf,
    /// Haar cascade XML; found in the OpenCV data directories when unset.
    pub haar_cascade: Option<PathBuf>,
    /// Minimum detector score (YuNet) to keep a face.
    pub score_threshold: f32,
    /// Overlap above which the weaker of two boxes is suppressed.
    pub nms_threshold: f32,
    /// Smallest face side in pixels of the full frame.
    pub min_face: u32,
    /// Haar only: frames are downscaled so their longer side is at most this before detection (YuNet always
    /// works on a 640×640 letterbox); crops come from the full frame.
    pub max_side: u32,
    /// Margin around the face box, as a fraction of its side; unset = the model's own (`emotiond.crop_margin`), else 0.1.
    pub margin: Option<f32>,
    /// Make crops square (FER-2013 faces are square).
    pub square: bool,
    /// Threads OpenCV may use in each camera's detection thread.
    pub opencv_threads: i32,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            backend: DetectorBackend::Yunet,
            yunet_model: "models/face_detection_yunet_2023mar.onnx".into(),
            haar_cascade: None,
            score_threshold: 0.7,
            nms_threshold: 0.3,
            min_face: 24,
            max_side: 640,
            margin: None,
            square: true,
            opencv_threads: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifyConfig {
    /// Emotion model (ONNX with emotiond metadata, or with a `<model>.json` sidecar).
    pub model: PathBuf,
    /// libonnxruntime.so; unset = `ORT_DYLIB_PATH`, then /usr/local/lib/emotiond, then /usr/lib/emotiond.
    pub ort_library: Option<PathBuf>,
    /// `auto` (CUDA if built with it and present, else CPU), `cpu` or `cuda`.
    pub provider: ExecutionProvider,
    /// ONNX Runtime intra-op threads for the classifier.
    pub threads: usize,
    /// A batch closes when it holds this many faces...
    pub max_batch: usize,
    /// ...or when its first face has waited this long (milliseconds).
    pub max_delay_ms: u64,
}

impl Default for ClassifyConfig {
    fn default() -> Self {
        Self {
            model: "models/fer2013_efficientnet_lite0_96.onnx".into(),
            ort_library: None,
            provider: ExecutionProvider::Auto,
            threads: 1,
            max_batch: 16,
            max_delay_ms: 2,
        }
    }
}

/// A secret string: never printed by `Debug` or logs.
#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `embedded` (an in-process broker on `embedded_bind:embedded_port`), `mqtt://host:port` (plain TCP,
    /// default port 1883) or `mqtts://host:port` (TLS, default port 8883; needs `[mqtt.tls]`).
    pub broker: String,
    /// Address the embedded broker listens on.
    pub embedded_bind: String,
    /// Port the embedded broker listens on.
    pub embedded_port: u16,
    /// First topic level: `<prefix>/<node>/<camera>/emotions`.
    pub topic_prefix: String,
    /// MQTT client id; defaults to `emotiond-<node>`.
    pub client_id: Option<String>,
    /// Keep-alive interval in seconds.
    pub keep_alive_s: u64,
    /// QoS of emotion messages (0, 1 or 2). Status messages use 1 and are retained. With 0 a message leaves the
    /// spool once written to the socket, without an acknowledgement.
    pub qos: u8,
    /// User name for the broker, if it asks for one.
    pub username: Option<String>,
    /// Its password; never printed (`Debug` shows `***`). Prefer `EMOTIOND__MQTT__PASSWORD` from a secret store.
    pub password: Option<Secret>,
    /// Publish a message for frames without faces too.
    pub publish_empty: bool,
    /// Results waiting between the cameras and the publisher (which writes them to the spool); beyond this, new
    /// ones are dropped and counted.
    pub queue: usize,
    /// Directory of the on-disk spool (emotion messages are written here first and leave once the broker has
    /// acknowledged them). Unset: `$STATE_DIRECTORY/spool` under systemd (`StateDirectory=`), else
    /// `.cache/emotiond/spool` relative to the working directory. The spool itself lives in a subdirectory named
    /// after the client id.
    pub spool_dir: Option<PathBuf>,
    /// Upper bound of the spool on disk in bytes; when full, the oldest messages are dropped and counted.
    pub spool_max_bytes: u64,
    /// fsync the spool at most this often (milliseconds); 0 = after every batch. Data written is already safe
    /// from a crash of the daemon itself; this bounds what a power cut can take.
    pub spool_fsync_ms: u64,
    /// Emotion messages sent but not yet acknowledged, at most (the in-flight window).
    pub inflight: u16,
    /// TLS for `mqtts://` brokers.
    pub tls: Option<MqttTlsConfig>,
}

/// `[mqtt.tls]`: how the broker's certificate is checked and how we prove who we are.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MqttTlsConfig {
    /// PEM file with the CA certificate(s) that signed the broker's certificate (for a public CA:
    /// `/etc/ssl/certs/ca-certificates.crt`).
    pub ca_file: PathBuf,
    /// PEM client certificate (chain) for mutual TLS; needs `client_key`.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            broker: "embedded".into(),
            embedded_bind: "127.0.0.1".into(),
            embedded_port: 1883,
            topic_prefix: "emotiond".into(),
            client_id: None,
            keep_alive_s: 30,
            qos: 1,
            username: None,
            password: None,
            publish_empty: false,
            queue: 256,
            spool_dir: None,
            spool_max_bytes: 64 << 20,
            spool_fsync_ms: 1000,
            inflight: 32,
            tls: None,
        }
    }
}

/// Where the MQTT client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerAddr {
    Embedded { bind: String, port: u16 },
    External { host: String, port: u16 },
}

impl MqttConfig {
    pub fn addr(&self) -> Result<BrokerAddr, String> {
        if self.broker == "embedded" {
            if self.embedded_port == 0 {
                return Err("mqtt.embedded_port must not be 0".into());
            }
            return Ok(BrokerAddr::Embedded {
                bind: self.embedded_bind.clone(),
                port: self.embedded_port,
            });
        }
        let (rest, default_port) = if let Some(r) = self
            .broker
            .strip_prefix("mqtt://")
            .or_else(|| self.broker.strip_prefix("tcp://"))
        {
            (r, 1883)
        } else if let Some(r) = self
            .broker
            .strip_prefix("mqtts://")
            .or_else(|| self.broker.strip_prefix("ssl://"))
        {
            (r, 8883)
        } else {
            return Err(format!(
                "mqtt.broker {:?}: expected `embedded`, mqtt://host:port or mqtts://host:port",
                self.broker
            ));
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => {
                let port: u16 = p.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
                    format!(
                        "mqtt.broker {:?}: port {p:?} is not a port number 1-65535",
                        self.broker
                    )
                })?;
                (h.to_owned(), port)
            }
            None => (rest.to_owned(), default_port),
        };
        if host.is_empty() || host.contains('/') {
            return Err(format!(
                "mqtt.broker {:?}: missing or invalid host",
                self.broker
            ));
        }
        Ok(BrokerAddr::External { host, port })
    }

    /// Whether the broker URL asks for TLS (`mqtts://` or `ssl://`).
    pub fn uses_tls(&self) -> bool {
        self.broker.starts_with("mqtts://") || self.broker.starts_with("ssl://")
    }

    /// The MQTT client id: `client_id`, else `emotiond-<node>`.
    pub fn client_id_for(&self, node: &str) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("emotiond-{node}"))
    }

    /// The spool directory for `client_id`: `<spool_dir>/<client_id>`, with `spool_dir` defaulting to
    /// `$STATE_DIRECTORY/spool` (systemd) or `.cache/emotiond/spool`.
    pub fn spool_path(&self, client_id: &str) -> PathBuf {
        let base = match &self.spool_dir {
            Some(d) => d.clone(),
            None => match std::env::var_os("STATE_DIRECTORY") {
                // systemd may pass several directories separated by `:`; the first is ours.
                Some(s) if !s.is_empty() => {
                    let s = s.to_string_lossy();
                    PathBuf::from(s.split(':').next().unwrap_or_default()).join("spool")
                }
                _ => PathBuf::from(".cache/emotiond/spool"),
            },
        };
        let name: String = client_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        base.join(name)
    }

    /// Every problem with the MQTT settings, for [`Config::validate`].
    fn problems(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if self.spool_max_bytes < 64 << 10 {
            errs.push(format!(
                "mqtt.spool_max_bytes = {}: must be at least 65536 (64 KiB)",
                self.spool_max_bytes
            ));
        }
        if self.inflight == 0 || self.inflight > 1000 {
            errs.push(format!(
                "mqtt.inflight = {}: must be 1..=1000",
                self.inflight
            ));
        }
        if self.spool_fsync_ms > 60_000 {
            errs.push(format!(
                "mqtt.spool_fsync_ms = {}: at most 60000 (a minute of data at risk on power loss)",
                self.spool_fsync_ms
            ));
        }
        match (&self.tls, self.uses_tls()) {
            (None, true) => errs.push(format!(
                "mqtt.broker {:?} uses TLS but [mqtt.tls] is missing: set mqtt.tls.ca_file to the CA that signed \
                 the broker's certificate (/etc/ssl/certs/ca-certificates.crt for a public CA)",
                self.broker
            )),
            (Some(_), false) => errs.push(format!(
                "[mqtt.tls] is set but mqtt.broker {:?} is not a TLS URL: use mqtts://host:port (emotiond never \
                 falls back to plaintext)",
                self.broker
            )),
            _ => {}
        }
        if let Some(tls) = &self.tls {
            if !tls.ca_file.is_file() {
                errs.push(format!(
                    "mqtt.tls.ca_file: {} does not exist",
                    tls.ca_file.display()
                ));
            }
            match (&tls.client_cert, &tls.client_key) {
                (Some(_), None) | (None, Some(_)) => errs.push(
                    "mqtt.tls.client_cert and mqtt.tls.client_key go together: set both for mutual TLS, or neither"
                        .into(),
                ),
                _ => {}
            }
            for (key, path) in [
                ("mqtt.tls.client_cert", &tls.client_cert),
                ("mqtt.tls.client_key", &tls.client_key),
            ] {
                if let Some(p) = path
                    && !p.is_file()
                {
                    errs.push(format!("{key}: {} does not exist", p.display()));
                }
            }
        }
        errs
    }
}

fn topic_safe(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

impl Config {
    /// The built-in demo: the bundled sample video, looped like a camera, through the bundled models, published
    /// on the embedded broker.
    pub fn demo() -> Self {
        let mut cam = CameraConfig::from_uri("demo", "media/sample.mp4");
        cam.looping = true;
        Self {
            cameras: vec![cam],
            ..Self::default()
        }
    }

    /// Reads `file` (when given) and the environment overrides. Without a file and without cameras from the
    /// environment, the result is [`Config::demo`].
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        let origin = match file {
            Some(path) => {
                if !path.is_file() {
                    return Err(ConfigError::Invalid(vec![format!(
                        "config file {} does not exist (pass --config with the path of a TOML file, or none for the built-in demo)",
                        path.display()
                    )]));
                }
                builder =
                    builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
                path.display().to_string()
            }
            None => {
                let demo = config::Config::try_from(&Self::demo()).map_err(|source| {
                    ConfigError::Load {
                        path: "(built-in defaults)".into(),
                        source,
                    }
                })?;
                builder = builder.add_source(demo);
                "(built-in defaults)".into()
            }
        };
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        builder
            .build()
            .and_then(|c| c.try_deserialize::<Config>())
            .map_err(|source| ConfigError::Load {
                path: origin,
                source,
            })
    }

    /// Checks every value and file; returns all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errs = Vec::new();
        if !topic_safe(&self.node.id) {
            errs.push(format!(
                "node.id {:?}: use letters, digits, `-`, `_` or `.`",
                self.node.id
            ));
        }
        if self.cameras.is_empty() {
            errs.push("no cameras configured: add a [[cameras]] table with an `id` and a `uri`, `device` or `pipeline`".into());
        }
        let mut seen = HashSet::new();
        for cam in &self.cameras {
            if !topic_safe(&cam.id) {
                errs.push(format!(
                    "camera id {:?}: use letters, digits, `-`, `_` or `.`",
                    cam.id
                ));
            }
            if !seen.insert(cam.id.as_str()) {
                errs.push(format!("camera id {:?} is used twice", cam.id));
            }
            if let Err(e) = cam.source() {
                errs.push(e);
            }
            // Bounded so that the durations made of them exist (a day; a frame a day).
            if !(0.0..=86_400.0).contains(&cam.stall_timeout_s) {
                errs.push(format!(
                    "camera `{}`: stall_timeout_s = {}: must be 0 (never) or positive, at most 86400 (a day)",
                    cam.id, cam.stall_timeout_s
                ));
            }
            if !(cam.max_fps == 0.0 || (1.0 / 86_400.0..=1000.0).contains(&cam.max_fps)) {
                errs.push(format!(
                    "camera `{}`: max_fps = {}: must be 0 (unlimited) or between 1/86400 and 1000",
                    cam.id, cam.max_fps
                ));
            }
        }
        let d = &self.detect;
        match d.backend {
            DetectorBackend::Yunet if !d.yunet_model.is_file() => errs.push(format!(
                "detect.yunet_model: {} does not exist (the repository ships models/face_detection_yunet_2023mar.onnx)",
                d.yunet_model.display()
            )),
            DetectorBackend::Haar => {
                if let Err(e) = crate::pipeline::detect::find_cascade(d.haar_cascade.as_deref()) {
                    errs.push(e.to_string());
                }
            }
            _ => {}
        }
        for (key, v) in [
            ("detect.score_threshold", d.score_threshold),
            ("detect.nms_threshold", d.nms_threshold),
        ] {
            if !(v > 0.0 && v < 1.0) {
                errs.push(format!("{key} = {v}: must be between 0 and 1"));
            }
        }
        if let Some(m) = d.margin
            && !(0.0..=1.0).contains(&m)
        {
            errs.push(format!("detect.margin = {m}: must be between 0 and 1"));
        }
        if d.max_side < 64 {
            errs.push(format!(
                "detect.max_side = {}: must be at least 64",
                d.max_side
            ));
        }
        if d.opencv_threads < 0 {
            errs.push("detect.opencv_threads must be 0 (OpenCV's default) or more".into());
        }
        let c = &self.classify;
        if !c.model.is_file() {
            errs.push(format!(
                "classify.model: {} does not exist",
                c.model.display()
            ));
        }
        if let Err(e) = crate::model::resolve_library(c.ort_library.as_deref()) {
            errs.push(e.to_string());
        }
        if !(1..=256).contains(&c.max_batch) {
            errs.push(format!(
                "classify.max_batch = {}: must be 1..=256",
                c.max_batch
            ));
        }
        if c.max_delay_ms > 1000 {
            errs.push(format!(
                "classify.max_delay_ms = {}: more than a second of added latency",
                c.max_delay_ms
            ));
        }
        if c.threads == 0 || c.threads > 64 {
            errs.push(format!("classify.threads = {}: must be 1..=64", c.threads));
        }
        let m = &self.mqtt;
        if let Err(e) = m.addr() {
            errs.push(e);
        }
        if m.qos > 2 {
            errs.push(format!("mqtt.qos = {}: must be 0, 1 or 2", m.qos));
        }
        if !topic_safe(&m.topic_prefix) {
            errs.push(format!(
                "mqtt.topic_prefix {:?}: use letters, digits, `-`, `_` or `.`",
                m.topic_prefix
            ));
        }
        if m.keep_alive_s < 5 {
            errs.push(format!(
                "mqtt.keep_alive_s = {}: must be at least 5",
                m.keep_alive_s
            ));
        }
        if m.queue == 0 {
            errs.push("mqtt.queue must be at least 1".into());
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            errs.push(format!(
                "metrics.listen {:?}: expected ip:port such as 127.0.0.1:9108, or \"\" to disable",
                self.metrics.listen
            ));
        }
        if m.password.is_some() && m.username.is_none() {
            errs.push("mqtt.password is set but mqtt.username is not".into());
        }
        errs.extend(m.problems());
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errs))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(Some(&path))
    }

    #[test]
    fn unknown_key_is_named() {
        let e = load_str("[mqtt]\nbrokr = \"embedded\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("brokr") && e.contains("c.toml"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = load_str("[classify]\nmax_batch = \"many\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_batch") || e.contains("many"), "{e}");
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let c = load_str("[[cameras]]\nid = \"a\"\nuri = \"rtsp://cam/1\"\n").unwrap();
        assert_eq!(c.cameras.len(), 1);
        assert!(c.cameras[0].realtime);
        assert_eq!(c.mqtt.broker, "embedded");
        assert_eq!(c.classify.max_batch, ClassifyConfig::default().max_batch);
    }

    #[test]
    fn validate_lists_every_problem() {
        let mut c = Config::default();
        c.mqtt.broker = "mqtt://host:99999".into();
        c.mqtt.qos = 3;
        c.classify.model = "/nonexistent/model.onnx".into();
        c.cameras
            .push(CameraConfig::from_uri("bad id", "/nonexistent.mp4"));
        let e = c.validate().unwrap_err().to_string();
        for needle in [
            "99999",
            "mqtt.qos",
            "/nonexistent/model.onnx",
            "bad id",
            "/nonexistent.mp4",
        ] {
            assert!(e.contains(needle), "missing {needle} in {e}");
        }
    }

    #[test]
    fn camera_durations_are_bounded() {
        for (stall, fps, bad) in [
            (1e20, 0.0, Some("stall_timeout_s = 100000000000000000000")),
            (-1.0, 0.0, Some("stall_timeout_s = -1")),
            (
                10.0,
                1e-30,
                Some("max_fps = 0.000000000000000000000000000001"),
            ),
            (10.0, f64::NAN, Some("max_fps = NaN")),
            (10.0, 5000.0, Some("max_fps = 5000")),
            (0.0, 0.0, None),
            (86_400.0, 0.05, None),
        ] {
            let mut c = Config::default();
            let mut cam = CameraConfig::from_uri("cam", "media/sample.mp4");
            cam.stall_timeout_s = stall;
            cam.max_fps = fps;
            c.cameras.push(cam);
            match (c.validate(), bad) {
                (Ok(()), None) => {}
                (Err(e), Some(needle)) => {
                    assert!(e.to_string().contains(needle), "{needle} not in {e}")
                }
                (r, _) => panic!("stall {stall}, max_fps {fps}: {r:?}"),
            }
        }
    }

    #[test]
    fn broker_addresses() {
        let mut m = MqttConfig::default();
        assert!(matches!(
            m.addr(),
            Ok(BrokerAddr::Embedded { port: 1883, .. })
        ));
        m.broker = "mqtt://broker.local:8883".into();
        assert_eq!(
            m.addr(),
            Ok(BrokerAddr::External {
                host: "broker.local".into(),
                port: 8883
            })
        );
        m.broker = "http://x".into();
        assert!(m.addr().is_err());
    }

    #[test]
    fn tls_broker_urls_and_checks() {
        let mut m = MqttConfig {
            broker: "mqtts://broker.local".into(),
            ..MqttConfig::default()
        };
        assert!(m.uses_tls());
        assert_eq!(
            m.addr(),
            Ok(BrokerAddr::External {
                host: "broker.local".into(),
                port: 8883
            })
        );
        // TLS URL without [mqtt.tls]: refused, with the key to set.
        let p = m.problems().join("\n");
        assert!(p.contains("mqtt.tls.ca_file"), "{p}");
        // [mqtt.tls] with a plaintext URL: refused, never silently plaintext.
        m.broker = "mqtt://broker.local".into();
        m.tls = Some(MqttTlsConfig {
            ca_file: "/nonexistent/ca.pem".into(),
            client_cert: Some("/nonexistent/c.pem".into()),
            client_key: None,
        });
        let p = m.problems().join("\n");
        for needle in [
            "plaintext",
            "/nonexistent/ca.pem",
            "go together",
            "/nonexistent/c.pem",
        ] {
            assert!(p.contains(needle), "missing {needle} in {p}");
        }
        m.tls = None;
        m.spool_max_bytes = 10;
        m.inflight = 0;
        let p = m.problems().join("\n");
        assert!(
            p.contains("spool_max_bytes") && p.contains("mqtt.inflight"),
            "{p}"
        );
    }

    #[test]
    fn tls_table_loads_from_toml() {
        let c = load_str(
            "[mqtt]\nbroker = \"mqtts://b:1\"\n[mqtt.tls]\nca_file = \"/ca.pem\"\nclient_cert = \"/c.pem\"\nclient_key = \"/k.pem\"\n",
        )
        .unwrap();
        let tls = c.mqtt.tls.unwrap();
        assert_eq!(tls.ca_file, PathBuf::from("/ca.pem"));
        assert_eq!(tls.client_key, Some(PathBuf::from("/k.pem")));
        let e = load_str("[mqtt.tls]\nca_fil = \"/ca.pem\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca_fil"), "{e}");
    }

    #[test]
    fn spool_path_defaults() {
        let m = MqttConfig {
            spool_dir: Some("/var/spool/x".into()),
            ..MqttConfig::default()
        };
        assert_eq!(
            m.spool_path("emotiond-a/b"),
            PathBuf::from("/var/spool/x/emotiond-a_b")
        );
        assert_eq!(m.client_id_for("kitchen"), "emotiond-kitchen");
    }

    #[test]
    fn secrets_are_redacted_in_the_whole_config() {
        let mut c = Config::default();
        c.mqtt.username = Some("user".into());
        c.mqtt.password = Some(Secret("hunter2-pw".into()));
        let text = format!("{c:?} {c:#?}");
        assert!(
            !text.contains("hunter2-pw") && text.contains("***"),
            "{text}"
        );
    }

    #[test]
    fn secrets_are_redacted() {
        let m = MqttConfig {
            password: Some(Secret("hunter2".into())),
            ..Default::default()
        };
        assert!(!format!("{m:?}").contains("hunter2"));
    }
}
