//! Connection and channel pools for publishing.
//!
//! A `deadpool` pool of connections (each opened by [`amqp::connect`], which
//! fails over between the brokers of a several-URL `TRAINYARD_AMQP_URL`) and on
//! top of it a pool of **confirm-mode channels**, so a publish never pays for
//! opening a channel and a broken channel or connection (closed by the broker,
//! lost with its node) is dropped on recycle instead of being handed out again.

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use lapin::{options::ConfirmSelectOptions, Channel, Connection};
use trainyard_common::{
    amqp::{self, redact_url},
    CommonError,
};

/// Pool of confirm-mode channels.
pub type ChannelPool = managed::Pool<ChannelManager>;
/// A channel taken from a [`ChannelPool`], returned to it when dropped.
pub type Pooled = managed::Object<ChannelManager>;

/// Opens named connections to the broker (or to one of several).
pub struct ConnectionManager {
    url: String,
    name: String,
}

impl managed::Manager for ConnectionManager {
    type Type = Connection;
    type Error = CommonError;

    async fn create(&self) -> Result<Connection, CommonError> {
        amqp::connect(&self.url, &self.name).await
    }

    async fn recycle(&self, conn: &mut Connection, _: &Metrics) -> RecycleResult<CommonError> {
        if conn.status().connected() {
            Ok(())
        } else {
            Err(RecycleError::message("connection is closed"))
        }
    }
}

/// Creates confirm-mode channels on pooled connections.
pub struct ChannelManager {
    connections: managed::Pool<ConnectionManager>,
    url: String,
}

impl std::fmt::Debug for ChannelManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelManager").field("url", &redact_url(&self.url)).finish_non_exhaustive()
    }
}

impl managed::Manager for ChannelManager {
    type Type = Channel;
    type Error = CommonError;

    async fn create(&self) -> Result<Channel, CommonError> {
        let conn = self.connections.get().await.map_err(|e| match e {
            managed::PoolError::Backend(inner) => inner,
            other => CommonError::PoolUnavailable { url: redact_url(&self.url), reason: other.to_string() },
        })?;
        let ch = conn.create_channel().await.map_err(CommonError::amqp("open a channel"))?;
        ch.confirm_select(ConfirmSelectOptions::default()).await.map_err(CommonError::amqp("enable publisher confirms"))?;
        Ok(ch)
    }

    async fn recycle(&self, ch: &mut Channel, _: &Metrics) -> RecycleResult<CommonError> {
        if ch.status().connected() {
            Ok(())
        } else {
            Err(RecycleError::message("channel is closed"))
        }
    }
}

/// Builds a channel pool of at most `max` channels over at most `max` connections.
pub fn channel_pool(url: &str, name: &str, max: usize) -> Result<ChannelPool, CommonError> {
    if amqp::broker_urls(url).is_empty() {
        return Err(CommonError::Config { name: "TRAINYARD_AMQP_URL".into(), reason: "no broker URL given".into() });
    }
    let connections = managed::Pool::builder(ConnectionManager { url: url.to_string(), name: name.to_string() })
        .max_size(max.clamp(1, 4))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .map_err(|e| CommonError::Config { name: "pool".into(), reason: e.to_string() })?;
    managed::Pool::builder(ChannelManager { connections, url: url.to_string() })
        .max_size(max.max(1))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .map_err(|e| CommonError::Config { name: "pool".into(), reason: e.to_string() })
}

/// Takes a channel from the pool, with the pool's error made readable.
pub async fn get(pool: &ChannelPool) -> Result<Pooled, CommonError> {
    pool.get().await.map_err(|e| match e {
        managed::PoolError::Backend(inner) => inner,
        other => CommonError::PoolUnavailable { url: "the channel pool".into(), reason: other.to_string() },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broker that is down is an outage with its cause, never "invalid setting".
    #[tokio::test]
    async fn an_unreachable_broker_is_a_connect_error() {
        let pool = channel_pool("amqp://guest:s3cret@127.0.0.1:1/%2f", "pool-test", 1).unwrap();
        let err = get(&pool).await.unwrap_err();
        assert!(matches!(err, CommonError::Connect { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.starts_with("failed to connect to the broker at amqp://guest:***@127.0.0.1:1"), "{msg}");
        assert!(!msg.contains("invalid setting") && !msg.contains("s3cret"), "{msg}");
    }
}
