//! The ficus CDC pipeline: PostgreSQL logical replication to Kafka (see issue 3; not built yet).
