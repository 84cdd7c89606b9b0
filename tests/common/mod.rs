//! Shared helpers for integration tests: an in-process broker on ephemeral loopback ports.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use midge::shard::{Broker, ListenerSpec, RuntimeConfig};

/// A broker for one test; shut down and joined on drop.
pub struct TestBroker {
    broker: Option<Broker>,
    /// The shared (REUSEPORT) listener.
    pub addr: SocketAddr,
    /// Each shard's own listener, to place a client on a chosen shard deterministically.
    pub shard_addrs: Vec<SocketAddr>,
}

impl TestBroker {
    pub fn start(shards: usize) -> TestBroker {
        Self::start_with(shards, |_| {})
    }

    pub fn start_with(shards: usize, tweak: impl FnOnce(&mut RuntimeConfig)) -> TestBroker {
        let mut cfg = RuntimeConfig {
            shards,
            listeners: vec![ListenerSpec {
                addr: "127.0.0.1:0".parse().unwrap(),
                allow_anonymous: true,
                max_connections: 0,
                max_qos: midge::codec::QoS::ExactlyOnce,
                topic_alias_maximum: 10,
                tls: None,
            }],
            shard_listeners: true,
            ..RuntimeConfig::default()
        };
        tweak(&mut cfg);
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let broker = midge::shard::start(cfg).expect("broker starts");
        TestBroker {
            addr: broker.listen_addrs[0],
            shard_addrs: broker.shard_addrs.clone(),
            broker: Some(broker),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn shard_port(&self, shard: usize) -> u16 {
        self.shard_addrs[shard].port()
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(b) = self.broker.take() {
            b.shutdown();
            b.join();
        }
    }
}

pub const WAIT: Duration = Duration::from_secs(5);
