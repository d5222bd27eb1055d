//! MQTT publishing: one task owns the rumqttc event loop, another feeds it.
//!
//! In: [`FrameResult`]s from a bounded channel. Out: JSON on `<prefix>/<node>/<camera>/emotions`, plus the
//! retained `<prefix>/<node>/status` (`online` on every connect, `offline` at shutdown and as Last Will).
//! An unreachable broker never blocks the video path: the client queue fills, then the bounded channel, then
//! camera threads drop results and count them. Reconnects back off from 0.5 s to 10 s.

use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions,
    Outgoing as MqttOutgoing, Packet, QoS,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::messages::Outgoing;
use crate::config::{BrokerAddr, MqttConfig};

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

/// Counters the publisher reports when it ends.
#[derive(Debug, Default, Clone, Copy)]
pub struct PublishStats {
    pub published: u64,
    pub failed: u64,
}

/// Runs until `rx` closes (every producer is gone), then publishes `offline`, disconnects and returns.
pub async fn run(cfg: MqttConfig, node: String, mut rx: mpsc::Receiver<Outgoing>) -> PublishStats {
    let (host, port) = match cfg.addr() {
        Ok(BrokerAddr::Embedded { bind, port }) => (connect_host(&bind), port),
        Ok(BrokerAddr::External { host, port }) => (host, port),
        Err(e) => {
            // validate() rejects this before start-up; keep the daemon alive anyway and say why nothing flows.
            tracing::error!("MQTT disabled: {e}. Results are dropped.");
            let mut stats = PublishStats::default();
            while rx.recv().await.is_some() {
                stats.failed += 1;
            }
            return stats;
        }
    };
    let client_id = cfg
        .client_id
        .clone()
        .unwrap_or_else(|| format!("emotiond-{node}"));
    let status = status_topic(&cfg.topic_prefix, &node);
    let mut opts = MqttOptions::new(client_id, host.clone(), port);
    opts.set_keep_alive(Duration::from_secs(cfg.keep_alive_s));
    opts.set_last_will(LastWill::new(&status, "offline", QoS::AtLeastOnce, true));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    if let Some(user) = &cfg.username {
        opts.set_credentials(
            user.clone(),
            cfg.password
                .as_ref()
                .map(|p| p.0.clone())
                .unwrap_or_default(),
        );
    }
    let (client, eventloop) = AsyncClient::new(opts, cfg.queue);
    let stop_loop = CancellationToken::new();
    let driver = tokio::spawn(drive(
        eventloop,
        client.clone(),
        status.clone(),
        format!("{host}:{port}"),
        stop_loop.clone(),
    ));

    let mut stats = PublishStats::default();
    let level = qos(cfg.qos);
    while let Some(msg) = rx.recv().await {
        let (topic, qos, retain, payload) = match msg {
            Outgoing::Frame(r) => (
                emotions_topic(&cfg.topic_prefix, &node, &r.camera),
                level,
                false,
                r.to_json(),
            ),
            Outgoing::Stats(json) => (
                format!("{}/{node}/stats", cfg.topic_prefix),
                QoS::AtMostOnce,
                false,
                json,
            ),
            Outgoing::CameraStatus { camera, state } => {
                let topic = camera_status_topic(&cfg.topic_prefix, &node, &camera);
                (topic, QoS::AtLeastOnce, true, state.as_str().to_owned())
            }
        };
        match client.publish(topic, qos, retain, payload).await {
            Ok(()) => {
                stats.published += 1;
                crate::telemetry::metrics()
                    .published
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                stats.failed += 1;
                tracing::warn!("Could not queue an MQTT message: {e}.");
            }
        }
    }

    // Give the event loop a moment to flush what is queued; a broker that is down gets nothing.
    let finish = async {
        let _ = client
            .publish(&status, QoS::AtLeastOnce, true, "offline")
            .await;
        let _ = client.disconnect().await;
        let _ = driver.await;
    };
    if tokio::time::timeout(Duration::from_secs(5), finish)
        .await
        .is_err()
    {
        tracing::warn!(
            "The MQTT broker did not take the last messages within 5 s; shutting down anyway."
        );
    }
    stop_loop.cancel();
    stats
}

/// The embedded broker listens on `bind`; a wildcard bind address is reached through loopback.
fn connect_host(bind: &str) -> String {
    match bind {
        "0.0.0.0" | "" => "127.0.0.1".into(),
        "::" => "::1".into(),
        b => b.into(),
    }
}

/// Polls the event loop: that is what actually sends. Reconnects with backoff; logs a broker outage once.
async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    status: String,
    addr: String,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(500);
    let mut down_since: Option<std::time::Instant> = None;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                match down_since.take() {
                    Some(t) => {
                        tracing::info!(broker = %addr, "Reconnected to the MQTT broker after {:.1} s.", t.elapsed().as_secs_f32())
                    }
                    None => tracing::info!(broker = %addr, "Connected to the MQTT broker."),
                }
                backoff = Duration::from_millis(500);
                crate::telemetry::metrics()
                    .mqtt_connected
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                let _ = client.try_publish(&status, QoS::AtLeastOnce, true, "online");
            }
            Ok(Event::Outgoing(MqttOutgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                if matches!(e, ConnectionError::RequestsDone) {
                    return;
                }
                let m = crate::telemetry::metrics();
                if m.mqtt_connected
                    .swap(false, std::sync::atomic::Ordering::Relaxed)
                {
                    m.mqtt_reconnects
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                if down_since.is_none() {
                    down_since = Some(std::time::Instant::now());
                    tracing::warn!(broker = %addr, "MQTT broker unreachable ({e}); retrying with backoff, results are queued and then dropped.");
                } else {
                    tracing::debug!(broker = %addr, "MQTT connection attempt failed: {e}");
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}
