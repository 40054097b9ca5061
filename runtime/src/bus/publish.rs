//! Publishing: the checks before a message is queued, and the bounded wait for room.

use super::*;

impl Bus {
    fn check_publish(&self, topic: &str, len: usize) -> Result<(), BusError> {
        if let Err(reason) = check_topic(topic) {
            return Err(BusError::InvalidTopic(topic.into(), reason));
        }
        if topic.len() > usize::from(u16::MAX) {
            return Err(BusError::InvalidTopic(
                topic.chars().take(64).collect(),
                "longer than 65535 bytes",
            ));
        }
        // The broker's limit covers the whole packet: topic and properties count too, and a
        // packet it refuses would be re-sent after every reconnect.
        let limit = self.inner.options.max_payload;
        let size = len + topic.len() + PACKET_OVERHEAD;
        if size > limit {
            return Err(BusError::TooLarge { size, limit });
        }
        Ok(())
    }

    fn count_publish<T>(&self, r: Result<T, BusError>) -> Result<T, BusError> {
        let c = &self.inner.counters;
        match &r {
            Ok(_) => c.published.fetch_add(1, Ordering::Relaxed),
            Err(_) => c.publish_failed.fetch_add(1, Ordering::Relaxed),
        };
        r
    }

    /// Publishes a message. Returns once it is queued for the connection (not when the
    /// broker acknowledged it). Waits at most `publish_timeout` for queue space.
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        options: PublishOptions,
    ) -> Result<(), BusError> {
        let payload = payload.into();
        let r = async {
            self.check_publish(topic, payload.len())?;
            if self.inner.closing.load(Ordering::Relaxed) {
                return Err(BusError::Closed);
            }
            let wait = self.inner.options.publish_timeout;
            let send = self.inner.client.publish_bytes_with_properties(
                topic,
                qos_of(options.qos),
                options.retain,
                payload,
                options.properties.unwrap_or_default(),
            );
            queue(wait, send).await
        }
        .await;
        if let Err(e) = &r {
            tracing::debug!(topic, error = %e, "publish failed");
        }
        self.count_publish(r)
    }

    /// Publishes without waiting: fails at once when the queue is full.
    pub fn try_publish(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        options: PublishOptions,
    ) -> Result<(), BusError> {
        let payload = payload.into();
        let r = self.check_publish(topic, payload.len()).and_then(|()| {
            self.inner
                .client
                .try_publish_with_properties(
                    topic,
                    qos_of(options.qos),
                    options.retain,
                    payload,
                    options.properties.unwrap_or_default(),
                )
                .map_err(|_| BusError::Backpressure(Duration::ZERO))
        });
        self.count_publish(r)
    }

    /// Publishes `value` as JSON.
    pub async fn publish_json<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
        options: PublishOptions,
    ) -> Result<(), BusError> {
        let payload = serde_json::to_vec(value).map_err(|e| BusError::Encode(e.to_string()));
        self.publish(topic, payload?, options).await
    }
}
