//! The embedded MQTT broker (`mqtt.broker = "embedded"`): rumqttd in-process, so a single-host robot or display
//! needs nothing else installed.
//!
//! In: a bind address and port. Out: a broker thread serving MQTT 3.1.1 with retained messages and Last Will.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("embedded MQTT broker: {addr} is not an address to listen on: {reason}")]
    Address { addr: String, reason: String },
    #[error(
        "embedded MQTT broker: cannot listen on {addr}: {source}; another broker probably runs there — set \
         `mqtt.embedded_port`, or use it with `mqtt.broker = \"mqtt://127.0.0.1:{port}\"`"
    )]
    Bind {
        addr: SocketAddr,
        port: u16,
        source: std::io::Error,
    },
    #[error("embedded MQTT broker could not start: {0}")]
    Start(String),
}

/// Starts the broker on its own thread; returns once the port is known to be free.
pub fn start(bind: &str, port: u16) -> Result<SocketAddr, BrokerError> {
    let addr = (bind, port)
        .to_socket_addrs()
        .map_err(|e| BrokerError::Address {
            addr: format!("{bind}:{port}"),
            reason: e.to_string(),
        })?
        .next()
        .ok_or_else(|| BrokerError::Address {
            addr: format!("{bind}:{port}"),
            reason: "no address".into(),
        })?;
    // rumqttd only logs a failed bind from its own thread; find out here so the user gets an error.
    drop(TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, port, source })?);

    let server = ServerSettings {
        name: "v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 1 << 20,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 1024,
            max_outgoing_packet_count: 1000,
            max_segment_size: 16 << 20,
            max_segment_count: 4,
            ..Default::default()
        },
        v4: Some(HashMap::from([("v4".to_owned(), server)])),
        ..Default::default()
    };
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(
                    "The embedded MQTT broker stopped: {e}. Results can no longer be published."
                );
            }
        })
        .map_err(|e| BrokerError::Start(e.to_string()))?;
    // Wait until it accepts connections, so the client's first attempt does not fail.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::net::TcpStream::connect(addr).is_err() {
        if std::time::Instant::now() > deadline {
            return Err(BrokerError::Start(format!(
                "nothing listens on {addr} 5 s after start"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    tracing::info!(%addr, "Embedded MQTT broker listening.");
    Ok(addr)
}
