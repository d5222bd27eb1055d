//! MQTT publishing through an on-disk spool: one task owns the rumqttc event loop, another owns the spool.
//!
//! In: [`Outgoing`] messages from a bounded channel. Out: JSON on `<prefix>/<node>/<camera>/emotions`, the
//! retained `<prefix>/<node>/<camera>/status`, and the retained `<prefix>/<node>/status` (`online` on every
//! connect, `offline` at shutdown and as Last Will), over plain TCP or TLS (`mqtts://`).
//!
//! # What is guaranteed
//! * **Write-ahead.** Every emotion message is appended to the [`Spool`] (handed to the OS, so it survives the
//!   daemon being killed) *before* it is sent. It leaves the spool only when the broker has acknowledged it
//!   (PUBACK for QoS 1, PUBCOMP for QoS 2; QoS 0 leaves once written to the socket).
//! * **In order.** Messages are sent from the spool in the order they were written, through a bounded in-flight
//!   window (`mqtt.inflight`). After a reconnect, sending restarts at the oldest unacknowledged message, so the
//!   broker receives them in order again.
//! * **No duplicates of our making.** Each connection gets a fresh rumqttc event loop with a clean session, so
//!   rumqttc never retransmits on its own: only this module re-sends, and only messages that were not
//!   acknowledged. A message that reached the broker but whose PUBACK was lost with the connection is sent again
//!   — MQTT QoS 1 cannot tell these apart, so in that case (at most `mqtt.inflight` messages per outage, usually
//!   none) a subscriber sees a duplicate. A daemon killed with SIGKILL may also re-send what was acknowledged in
//!   its last [`ACK_PERSIST_INTERVAL`](super::spool::ACK_PERSIST_INTERVAL) (+ 100 ms). Subscribers that need strict exactly-once can drop a repeated
//!   `(node, camera, seq, ts_ms)`.
//! * **Bounded.** The spool is bounded by `mqtt.spool_max_bytes`; when full, the oldest messages are dropped,
//!   counted and logged (ERROR, at most every 10 s). Memory holds at most the in-flight window.
//! * **Status.** Camera and node status messages are retained "latest state" topics: they are not spooled, but the
//!   latest state of every camera is published again on every (re)connect, so none is lost.
//! * **TLS.** `mqtts://` uses rustls with the configured CA; a certificate problem is an ERROR naming the broker,
//!   and there is no fallback to plaintext.
//!
//! An unreachable broker never blocks the video path: results go to disk, not memory.

use std::sync::atomic::Ordering;

use crate::telemetry::metrics;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectionError, Event, LastWill, MqttOptions, Outgoing as MqttOutgoing, Packet,
    QoS, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::messages::{CameraState, Outgoing};
use super::spool::{Spool, SpoolError};
use crate::config::{BrokerAddr, MqttConfig, MqttTlsConfig};

pub fn emotions_topic(prefix: &str, node: &str, camera: &str) -> String {
    format!("{prefix}/{node}/{camera}/emotions")
}

pub fn status_topic(prefix: &str, node: &str) -> String {
    format!("{prefix}/{node}/status")
}

pub fn camera_status_topic(prefix: &str, node: &str, camera: &str) -> String {
    format!("{prefix}/{node}/{camera}/status")
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// How long shutdown waits for the broker to take what is still in the spool; the rest stays for the next start.
const DRAIN_ON_SHUTDOWN: Duration = Duration::from_secs(5);
/// Reconnect backoff.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A full spool is logged at most this often.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("mqtt.tls.{key} {path}: {reason}")]
    TlsFile {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS settings rejected: {0}")]
    Tls(#[from] rustls::Error),
}

/// Counters the publisher reports when it ends.
#[derive(Debug, Default, Clone, Copy)]
pub struct PublishStats {
    /// Emotion messages the broker acknowledged.
    pub published: u64,
    /// Messages that could not be kept (spool unusable) or were dropped because the spool was full.
    pub failed: u64,
    /// Emotion messages written to the spool.
    pub spooled: u64,
    /// Sessions with the broker after the first.
    pub reconnects: u64,
    /// Emotion messages still in the spool at exit (delivered after the next start).
    pub left_in_spool: u64,
}

/// What the connection task reports to the publisher.
enum LinkEvent {
    /// A new session: publish through this client (its event loop is fresh, nothing is queued in it).
    Connected(AsyncClient),
    /// The session ended; everything sent in it and not acknowledged must be sent again.
    Disconnected,
    /// A connection attempt failed (reported once per outage).
    Unreachable,
    /// rumqttc wrote a PUBLISH with this packet id (in the order we queued them).
    Sent(u16),
    /// The broker acknowledged this packet id.
    Acked(u16),
}

/// Something queued in the current session's client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    Spooled(u64),
    Status,
}

/// Runs until `rx` closes (every producer is gone), then tries for a few seconds to deliver what is spooled,
/// publishes `offline`, disconnects and returns.
pub async fn run(cfg: MqttConfig, node: String, mut rx: mpsc::Receiver<Outgoing>) -> PublishStats {
    let (host, port) = match cfg.addr() {
        Ok(BrokerAddr::Embedded { bind, port }) => (connect_host(&bind), port),
        Ok(BrokerAddr::External { host, port }) => (host, port),
        Err(e) => return disabled(&e, rx).await,
    };
    let client_id = cfg.client_id_for(&node);
    let status = status_topic(&cfg.topic_prefix, &node);
    let url = format!(
        "{}://{host}:{port}",
        if cfg.uses_tls() { "mqtts" } else { "mqtt" }
    );

    let mut opts = MqttOptions::new(client_id.clone(), host.clone(), port);
    opts.set_keep_alive(Duration::from_secs(cfg.keep_alive_s));
    opts.set_last_will(LastWill::new(&status, "offline", QoS::AtLeastOnce, true));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    // rumqttc must never re-send on its own (we do, from the spool): a clean session makes it discard its
    // pending list on every connect.
    opts.set_clean_session(true);
    let window = usize::from(cfg.inflight.max(1));
    // Room for the window plus status messages, so ack order never collides with packet-id reuse.
    opts.set_inflight(cfg.inflight.saturating_add(64));
    if let Some(user) = &cfg.username {
        opts.set_credentials(
            user.clone(),
            cfg.password
                .as_ref()
                .map(|p| p.0.clone())
                .unwrap_or_default(),
        );
    }
    let tls_ok = match (&cfg.tls, cfg.uses_tls()) {
        (Some(tls), true) => match client_tls(tls) {
            Ok(c) => {
                opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                    Arc::new(c),
                )));
                true
            }
            Err(e) => {
                tracing::error!(broker = %url, "Cannot connect to the MQTT broker {url}: {e}. Results are kept in the spool until this is fixed.");
                false
            }
        },
        (None, true) => {
            tracing::error!(broker = %url, "The MQTT broker {url} needs TLS but [mqtt.tls] is not set; not connecting (no plaintext fallback). Results are kept in the spool.");
            false
        }
        (_, false) => true,
    };

    let (spool, private_spool) = match open_spool(&cfg, &client_id) {
        Some(s) => s,
        None => return disabled("the spool could not be opened", rx).await,
    };
    if spool.pending() > 0 {
        tracing::info!(spool = %spool.dir().display(), messages = spool.pending(), "Spooled messages from an earlier run will be delivered first.");
    }

    let (link_tx, link_rx) = mpsc::unbounded_channel();
    let stop_link = CancellationToken::new();
    let driver = tls_ok.then(|| {
        tokio::spawn(drive(
            opts,
            window + 1024,
            url.clone(),
            cfg.qos,
            link_tx,
            stop_link.clone(),
        ))
    });

    let mut p = Publisher {
        spool,
        prefix: cfg.topic_prefix.clone(),
        node: node.clone(),
        status,
        qos: qos(cfg.qos),
        window,
        client: None,
        queued: VecDeque::new(),
        inflight: HashMap::new(),
        acked_ahead: BTreeSet::new(),
        cameras: BTreeMap::new(),
        stats: PublishStats::default(),
        dropped_in_flight: 0,
        dropped_unlogged: 0,
        last_drop_log: None,
        lost_unlogged: 0,
        last_loss_log: None,
        sessions: 0,
        down_since: None,
        url,
    };
    let mut link_rx = link_rx;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                // Appending may rotate a segment (write, fsync, create) and flushing writes: disk work.
                Some(m) => blocking(|| {
                    p.take(m);
                    // Everything already waiting goes into the same batch: one write(2) for all of them.
                    while let Ok(m) = rx.try_recv() {
                        p.take(m);
                    }
                    p.flush_spool();
                }),
                None => break,
            },
            Some(ev) = link_rx.recv() => p.on_link(ev),
            _ = tick.tick() => p.housekeeping(false),
        }
        p.fill();
    }

    // Shutdown: the cameras are gone. Give the broker a few seconds to take what is left.
    p.flush_spool();
    let until = tokio::time::Instant::now() + DRAIN_ON_SHUTDOWN;
    if p.client.is_some() && (p.spool.pending() > 0 || p.in_flight_dropped() > 0) {
        loop {
            p.fill();
            if (p.spool.pending() == 0 && p.in_flight_dropped() == 0) || p.client.is_none() {
                break;
            }
            match tokio::time::timeout_at(until, link_rx.recv()).await {
                Ok(Some(ev)) => p.on_link(ev),
                _ => break,
            }
        }
    }
    p.stats.left_in_spool = p.spool.pending();
    if p.stats.left_in_spool > 0 {
        tracing::warn!(spool = %p.spool.dir().display(), messages = p.stats.left_in_spool, "Stopping with undelivered messages in the spool; they are sent after the next start.");
    }
    if let Err(e) = blocking(|| p.spool.sync().and_then(|()| p.spool.persist_ack())) {
        tracing::error!("{e}");
    }
    p.housekeeping(true);

    if let Some(client) = p.client.take() {
        let finish = async {
            let _ = client
                .publish(&p.status, QoS::AtLeastOnce, true, "offline")
                .await;
            let _ = client.disconnect().await;
            // Let the event loop write both; it ends at the DISCONNECT.
            while let Some(ev) = link_rx.recv().await {
                if matches!(ev, LinkEvent::Disconnected) {
                    break;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(2), finish)
            .await
            .is_err()
        {
            tracing::warn!(
                "The MQTT broker did not take the last messages within 2 s; shutting down anyway."
            );
        }
    }
    stop_link.cancel();
    if let Some(d) = driver {
        let _ = d.await;
    }
    let stats = p.stats;
    let dir = p.spool.dir().to_owned();
    drop(p);
    if private_spool && stats.left_in_spool == 0 {
        let _ = std::fs::remove_dir_all(&dir);
    }
    stats
}

/// No broker address or no spool: count what arrives and say why nothing flows.
async fn disabled(why: &str, mut rx: mpsc::Receiver<Outgoing>) -> PublishStats {
    // validate() rejects a bad address before start-up; keep the daemon alive anyway.
    tracing::error!("MQTT disabled: {why}. Results are dropped.");
    let mut stats = PublishStats::default();
    while rx.recv().await.is_some() {
        stats.failed += 1;
    }
    stats
}

/// Opens the spool; if another daemon holds it, or it cannot be created, falls back to a private one (said
/// loudly: messages in a private spool are only replayed by a daemon that is pointed at it).
/// Returns the spool and whether it is such a private one (removed at exit when empty).
fn open_spool(cfg: &MqttConfig, client_id: &str) -> Option<(Spool, bool)> {
    let dir = cfg.spool_path(client_id);
    let fsync = Duration::from_millis(cfg.spool_fsync_ms);
    let err = match Spool::open(&dir, cfg.spool_max_bytes, fsync) {
        Ok(s) => return Some((s, false)),
        Err(e) => e,
    };
    let fallback = match &err {
        SpoolError::Locked(_) => {
            let mut name = dir.file_name().unwrap_or_default().to_owned();
            name.push(format!("-pid{}", std::process::id()));
            dir.with_file_name(name)
        }
        SpoolError::Io { .. } => {
            std::env::temp_dir().join(format!("emotiond-spool-{}", std::process::id()))
        }
    };
    match Spool::open(&fallback, cfg.spool_max_bytes, fsync) {
        Ok(s) => {
            tracing::error!(spool = %fallback.display(), "{err}. Using a private spool in {} for this run instead.", fallback.display());
            Some((s, true))
        }
        Err(e2) => {
            tracing::error!("{err}; the fallback failed too: {e2}.");
            None
        }
    }
}

/// The rustls client settings for `[mqtt.tls]`: the CA to trust, and our certificate for mutual TLS.
pub fn client_tls(tls: &MqttTlsConfig) -> Result<rustls::ClientConfig, PublishError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs =
        |key: &'static str, path: &Path| -> Result<Vec<CertificateDer<'static>>, PublishError> {
            let bad = |reason: String| PublishError::TlsFile {
                key,
                path: path.to_owned(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("not a PEM certificate file ({e})")))?;
            if certs.is_empty() {
                return Err(bad(
                    "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
                ));
            }
            Ok(certs)
        };
    let mut roots = rustls::RootCertStore::empty();
    for c in certs("ca_file", &tls.ca_file)? {
        roots.add(c).map_err(|e| PublishError::TlsFile {
            key: "ca_file",
            path: tls.ca_file.clone(),
            reason: format!("certificate rejected: {e}"),
        })?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let chain = certs("client_cert", cert)?;
            let pk = PrivateKeyDer::from_pem_file(key).map_err(|e| PublishError::TlsFile {
                key: "client_key",
                path: key.clone(),
                reason: format!("no usable PEM private key ({e})"),
            })?;
            builder.with_client_auth_cert(chain, pk)?
        }
        _ => builder.with_no_client_auth(),
    })
}

/// The publisher's state: the spool, the current session, and what is in flight in it.
struct Publisher {
    spool: Spool,
    prefix: String,
    node: String,
    status: String,
    qos: QoS,
    window: usize,
    /// The current session's client; `None` while the broker is away.
    client: Option<AsyncClient>,
    /// Queued in the client, waiting for rumqttc to give them a packet id ([`LinkEvent::Sent`]), in order.
    queued: VecDeque<Item>,
    /// Sent, waiting for the acknowledgement, by packet id.
    inflight: HashMap<u16, Item>,
    /// Acknowledged out of order (ahead of the spool's cursor); skipped when re-sending.
    acked_ahead: BTreeSet<u64>,
    /// Latest state of every camera: re-published on each connect.
    cameras: BTreeMap<String, CameraState>,
    stats: PublishStats,
    /// In-flight messages lost with their session after the spool had dropped their records (not yet counted).
    dropped_in_flight: u64,
    dropped_unlogged: u64,
    last_drop_log: Option<Instant>,
    /// Spool write failures not yet logged, and when the last were.
    lost_unlogged: u64,
    last_loss_log: Option<Instant>,
    sessions: u64,
    down_since: Option<Instant>,
    url: String,
}

impl Publisher {
    /// A message from the cameras: emotions go to the spool, statuses straight out (or wait for the connect).
    fn take(&mut self, m: Outgoing) {
        match m {
            Outgoing::Frame(r) => {
                let topic = emotions_topic(&self.prefix, &self.node, &r.camera);
                match self.spool.append(&topic, r.to_json().as_bytes()) {
                    Ok(_) => self.stats.spooled += 1,
                    Err(e) => {
                        // A full or broken disk fails every append: say it once per interval, with the count.
                        self.stats.failed += 1;
                        self.lost_unlogged += 1;
                        if self
                            .last_loss_log
                            .is_none_or(|t| t.elapsed() >= DROP_LOG_INTERVAL)
                        {
                            tracing::error!(
                                lost = self.lost_unlogged,
                                "Results could not be written to the spool and are lost: {e}."
                            );
                            self.lost_unlogged = 0;
                            self.last_loss_log = Some(Instant::now());
                        }
                    }
                }
            }
            Outgoing::CameraStatus { camera, state } => {
                self.cameras.insert(camera.clone(), state);
                self.publish_status(&camera, state);
            }
            // Stats are a snapshot: sent when connected, never spooled (the next one supersedes it).
            Outgoing::Stats(json) => {
                let Some(client) = &self.client else { return };
                let topic = format!("{}/{}/stats", self.prefix, self.node);
                if client
                    .try_publish(topic, QoS::AtMostOnce, false, json)
                    .is_ok()
                {
                    self.queued.push_back(Item::Status);
                }
            }
        }
        metrics()
            .spool_bytes
            .store(self.spool.bytes(), Ordering::Relaxed);
    }

    fn flush_spool(&mut self) {
        if let Err(e) = self.spool.flush() {
            tracing::error!(
                "Spool write failed; the latest results may be lost if the daemon dies now: {e}."
            );
        }
    }

    fn publish_status(&mut self, camera: &str, state: CameraState) {
        let Some(client) = &self.client else { return };
        let topic = camera_status_topic(&self.prefix, &self.node, camera);
        if client
            .try_publish(topic, QoS::AtLeastOnce, true, state.as_str())
            .is_ok()
        {
            self.queued.push_back(Item::Status);
        }
    }

    /// Sends from the spool while the in-flight window has room.
    fn fill(&mut self) {
        let Some(client) = &self.client else { return };
        loop {
            let outstanding = self.queued.len() + self.inflight.len();
            if outstanding >= self.window {
                return;
            }
            let recs = match blocking(|| self.spool.read_next(self.window - outstanding)) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("Reading the spool failed: {e}.");
                    return;
                }
            };
            if recs.is_empty() {
                return;
            }
            for rec in recs {
                if self.acked_ahead.contains(&rec.id) {
                    continue;
                }
                let id = rec.id;
                if let Err(e) = client.try_publish(rec.topic, self.qos, false, rec.payload) {
                    // Only when the session just ended: it is re-sent after the reconnect.
                    tracing::debug!("Could not queue an MQTT message: {e}.");
                    self.spool.seek(id);
                    return;
                }
                self.queued.push_back(Item::Spooled(id));
            }
        }
    }

    fn on_link(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Connected(client) => {
                metrics().mqtt_connected.store(true, Ordering::Relaxed);
                self.sessions += 1;
                if self.sessions > 1 {
                    self.stats.reconnects += 1;
                }
                let pending = self.spool.pending();
                match self.down_since.take() {
                    Some(t) => {
                        tracing::info!(broker = %self.url, spooled = pending, "Reconnected to the MQTT broker after {:.1} s; sending {pending} spooled messages.", t.elapsed().as_secs_f32())
                    }
                    None if pending > 0 => {
                        tracing::info!(broker = %self.url, spooled = pending, "Connected to the MQTT broker; sending {pending} spooled messages.")
                    }
                    None => tracing::info!(broker = %self.url, "Connected to the MQTT broker."),
                }
                self.forget_in_flight();
                self.spool.rewind();
                if client
                    .try_publish(&self.status, QoS::AtLeastOnce, true, "online")
                    .is_ok()
                {
                    self.queued.push_back(Item::Status);
                }
                self.client = Some(client);
                // Retained states are "latest wins": publish every camera's again, none is lost in an outage.
                for (camera, state) in self.cameras.clone() {
                    self.publish_status(&camera, state);
                }
            }
            LinkEvent::Unreachable => {
                metrics().mqtt_connected.store(false, Ordering::Relaxed);
                self.down_since.get_or_insert_with(Instant::now);
            }
            LinkEvent::Disconnected => {
                if metrics().mqtt_connected.swap(false, Ordering::Relaxed) {
                    metrics().mqtt_reconnects.fetch_add(1, Ordering::Relaxed);
                }
                if self.client.take().is_some() {
                    self.down_since = Some(Instant::now());
                }
                // The old event loop is gone with everything queued in it: all of it is sent again.
                self.forget_in_flight();
                self.spool.rewind();
                if let Err(e) = blocking(|| self.spool.persist_ack()) {
                    tracing::error!("{e}");
                }
            }
            LinkEvent::Sent(pkid) => match self.queued.pop_front() {
                Some(Item::Spooled(id)) if self.qos == QoS::AtMostOnce => self.acked(id),
                Some(item) if pkid != 0 => {
                    self.inflight.insert(pkid, item);
                }
                Some(_) => {}
                None => tracing::debug!(pkid, "PUBLISH we did not queue (this is a bug)."),
            },
            LinkEvent::Acked(pkid) => {
                if let Some(Item::Spooled(id)) = self.inflight.remove(&pkid) {
                    self.acked(id);
                }
            }
        }
    }

    /// Spooled messages sent (or queued to send) whose records the spool has since dropped for space: their
    /// acknowledgement is the only sign they arrived.
    fn in_flight_dropped(&self) -> u64 {
        let floor = self.spool.acked();
        self.queued
            .iter()
            .chain(self.inflight.values())
            .filter(|i| matches!(i, Item::Spooled(id) if *id < floor))
            .count() as u64
    }

    /// Forgets what the old session had in flight (it is sent again from the spool); what the spool no longer
    /// holds cannot be, and is counted as dropped.
    fn forget_in_flight(&mut self) {
        self.dropped_in_flight += self.in_flight_dropped();
        self.queued.clear();
        self.inflight.clear();
    }

    fn acked(&mut self, id: u64) {
        self.stats.published += 1;
        metrics().published.fetch_add(1, Ordering::Relaxed);
        let mut cursor = self.spool.acked();
        if id < cursor {
            return;
        }
        if id > cursor {
            self.acked_ahead.insert(id);
            return;
        }
        cursor += 1;
        while self.acked_ahead.remove(&cursor) {
            cursor += 1;
        }
        if let Err(e) = self.spool.ack(cursor) {
            tracing::error!("{e}");
        }
        // Segments dropped for space move the cursor too.
        let floor = self.spool.acked();
        self.acked_ahead = self.acked_ahead.split_off(&floor);
    }

    /// Timer work: owed fsync, ack cursor, spool-full reports (`last`: at exit, report whatever is left).
    fn housekeeping(&mut self, last: bool) {
        if self.spool.sync_due()
            && let Err(e) = blocking(|| self.spool.sync())
        {
            tracing::error!("{e}");
        }
        if let Err(e) = self.spool.persist_ack_if_due() {
            tracing::error!("{e}");
        }
        if last && self.lost_unlogged > 0 {
            tracing::error!(
                lost = self.lost_unlogged,
                "Results could not be written to the spool and are lost."
            );
            self.lost_unlogged = 0;
        }
        if last {
            // Sent, dropped from the spool, and not acknowledged by the end of the drain: not known to have arrived.
            self.dropped_in_flight += self.in_flight_dropped();
        }
        let dropped = self.spool.take_dropped() + std::mem::take(&mut self.dropped_in_flight);
        metrics()
            .spool_dropped
            .fetch_add(dropped, Ordering::Relaxed);
        metrics()
            .spool_bytes
            .store(self.spool.bytes(), Ordering::Relaxed);
        self.stats.failed += dropped;
        self.dropped_unlogged += dropped;
        if self.dropped_unlogged > 0
            && (last
                || self
                    .last_drop_log
                    .is_none_or(|t| t.elapsed() >= DROP_LOG_INTERVAL))
        {
            tracing::error!(
                spool = %self.spool.dir().display(),
                dropped = self.dropped_unlogged,
                "The MQTT spool is full (mqtt.spool_max_bytes); the {} oldest undelivered messages were dropped.",
                self.dropped_unlogged
            );
            self.dropped_unlogged = 0;
            self.last_drop_log = Some(Instant::now());
        }
    }
}

/// The embedded broker listens on `bind`; a wildcard bind address is reached through loopback.
fn connect_host(bind: &str) -> String {
    match bind {
        "0.0.0.0" | "" => "127.0.0.1".into(),
        "::" => "::1".into(),
        b => b.into(),
    }
}

/// Whether a connection error is about certificates (ours or the broker's): an operator must act.
fn is_certificate_error(e: &ConnectionError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    matches!(e, ConnectionError::Tls(_)) || text.contains("certificate")
}

/// The events the publisher needs: sends and acknowledgements.
fn report(ev: &Event, qos_level: u8) -> Option<LinkEvent> {
    match ev {
        Event::Outgoing(MqttOutgoing::Publish(pkid)) => Some(LinkEvent::Sent(*pkid)),
        Event::Incoming(Packet::PubAck(a)) => Some(LinkEvent::Acked(a.pkid)),
        Event::Incoming(Packet::PubComp(c)) if qos_level == 2 => Some(LinkEvent::Acked(c.pkid)),
        _ => None,
    }
}

/// Owns the connection: one fresh rumqttc event loop per session (so nothing queued in a dead session is ever
/// sent later by rumqttc), reconnects with backoff, and reports sends and acknowledgements in order.
async fn drive(
    opts: MqttOptions,
    cap: usize,
    url: String,
    qos_level: u8,
    tx: mpsc::UnboundedSender<LinkEvent>,
    stop: CancellationToken,
) {
    let mut backoff = BACKOFF_FIRST;
    let mut outage_logged = false;
    let mut cert_logged = false;
    'session: loop {
        let (client, mut eventloop) = AsyncClient::new(opts.clone(), cap);
        // Connect (the same loop may try many times: nothing is queued in it until we say Connected).
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return,
                e = eventloop.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = BACKOFF_FIRST;
                    cert_logged = false;
                    if tx.send(LinkEvent::Connected(client.clone())).is_err() {
                        return;
                    }
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    // A certificate problem needs an operator: ERROR, once per outage, even after a "Lost" warning.
                    if is_certificate_error(&e) && !cert_logged {
                        cert_logged = true;
                        outage_logged = true;
                        let _ = tx.send(LinkEvent::Unreachable);
                        let advice = if e.to_string().to_ascii_lowercase().contains("certificate") {
                            "The certificate was not accepted: check that mqtt.tls.ca_file holds the CA that signed the broker's certificate, that the certificate names this host, and that the broker accepts our client certificate"
                        } else {
                            "The TLS handshake did not complete: check that this port is the broker's TLS listener and that it accepts our client certificate (mqtt.tls.client_cert)"
                        };
                        tracing::error!(broker = %url, "TLS connection to the MQTT broker {url} failed: {e}. {advice}. Not falling back to plaintext; results are kept in the spool.");
                    } else if !outage_logged {
                        outage_logged = true;
                        tracing::warn!(broker = %url, "MQTT broker unreachable ({e}); retrying with backoff, results are kept in the spool.");
                        let _ = tx.send(LinkEvent::Unreachable);
                    } else {
                        tracing::debug!(broker = %url, "MQTT connection attempt failed: {e}");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        // Connected: report what rumqttc sends and what the broker acknowledges.
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return,
                e = eventloop.poll() => e,
            };
            let report = match event {
                Ok(ev) if report(&ev, qos_level).is_some() => {
                    report(&ev, qos_level).expect("checked")
                }
                Ok(Event::Outgoing(MqttOutgoing::Disconnect)) => {
                    // Our own DISCONNECT at shutdown (rumqttc has written it when it reports it).
                    let _ = tx.send(LinkEvent::Disconnected);
                    return;
                }
                Ok(_) => continue,
                Err(ConnectionError::RequestsDone) => {
                    let _ = tx.send(LinkEvent::Disconnected);
                    return;
                }
                Err(e) => {
                    outage_logged = true;
                    tracing::warn!(broker = %url, "Lost the MQTT broker ({e}); reconnecting with backoff, results are kept in the spool.");
                    // Acknowledgements read together with the end of the connection are still buffered in the
                    // event loop: report them, or those messages would be sent twice.
                    for ev in eventloop.state.events.drain(..) {
                        if let Some(r) = report(&ev, qos_level) {
                            let _ = tx.send(r);
                        }
                    }
                    drop(eventloop);
                    if tx.send(LinkEvent::Disconnected).is_err() {
                        return;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    continue 'session;
                }
            };
            if tx.send(report).is_err() {
                return;
            }
        }
    }
}

/// Runs spool file I/O that may block (appends that rotate a segment, flushes, replay reads, fsync) so that it
/// does not stall the runtime's other tasks: on the daemon's multi-thread runtime the worker hands them to
/// another thread first. Memory-only bookkeeping (acknowledgements) stays outside: each call costs a hand-over.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
