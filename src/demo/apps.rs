//! The demo's two sample services: the legacy "shop" monolith, reading and writing
//! PostgreSQL, and the new "orders" service, which reads its own database, kept in step
//! with the shop's orders by `ficus sink` from the CDC events on Kafka.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::{json, Value};

fn respond(status: StatusCode, backend: &str, body: &Value) -> Response<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(body).unwrap_or_default();
    bytes.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("content-length", bytes.len())
        .header("x-backend", backend)
        .body(bytes)
        .unwrap_or_default()
}

/// The order id in `/api/orders/{id}`, if the path has one.
fn order_id(path: &str) -> Option<i32> {
    path.strip_prefix("/api/orders/").and_then(|id| id.trim_end_matches('/').parse().ok())
}

/// The legacy monolith: every order read and write goes to its database.
pub struct Shop {
    pub db: Arc<tokio_postgres::Client>,
}

impl Shop {
    async fn handle(
        &self,
        session: &mut ServerSession,
    ) -> Result<(StatusCode, Value), tokio_postgres::Error> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        const COLUMNS: &str = "id, customer_id, item, quantity, total::text, status";
        let row_json = |row: &tokio_postgres::Row| {
            json!({"id": row.get::<_, i32>(0), "customer_id": row.get::<_, i32>(1), "item": row.get::<_, String>(2),
                   "quantity": row.get::<_, i32>(3), "total": row.get::<_, String>(4), "status": row.get::<_, String>(5)})
        };
        Ok(match (method, path.as_str()) {
            (Method::GET, "/api/orders") => {
                let rows = self
                    .db
                    .query(&format!("SELECT {COLUMNS} FROM orders ORDER BY id"), &[])
                    .await?;
                (
                    StatusCode::OK,
                    json!({"served_by": "monolith", "orders": rows.iter().map(row_json).collect::<Vec<_>>()}),
                )
            }
            (Method::GET, _) if order_id(&path).is_some() => {
                let id = order_id(&path).unwrap_or_default();
                match self
                    .db
                    .query_opt(&format!("SELECT {COLUMNS} FROM orders WHERE id = $1"), &[&id])
                    .await?
                {
                    Some(row) => {
                        (StatusCode::OK, json!({"served_by": "monolith", "order": row_json(&row)}))
                    }
                    None => (
                        StatusCode::NOT_FOUND,
                        json!({"served_by": "monolith", "error": "no such order"}),
                    ),
                }
            }
            (Method::POST, "/api/orders") => {
                let mut body = Vec::new();
                while let Ok(Some(chunk)) = session.read_request_body().await {
                    body.extend_from_slice(&chunk);
                }
                let Ok(order) = serde_json::from_slice::<Value>(&body) else {
                    return Ok((
                        StatusCode::BAD_REQUEST,
                        json!({"error": "expected {\"customer_id\", \"item\", \"quantity\"}"}),
                    ));
                };
                let customer = order["customer_id"].as_i64().unwrap_or(1) as i32;
                let item = order["item"].as_str().unwrap_or("widget").to_string();
                let quantity = order["quantity"].as_i64().unwrap_or(1) as i32;
                let row = self
                    .db
                    .query_one(
                        &format!("INSERT INTO orders (customer_id, item, quantity, total) VALUES ($1, $2, $3, $3::int * 9.99) RETURNING {COLUMNS}"),
                        &[&customer as &(dyn tokio_postgres::types::ToSql + Sync), &item, &quantity],
                    )
                    .await?;
                (StatusCode::CREATED, json!({"served_by": "monolith", "order": row_json(&row)}))
            }
            (_, "/healthz") => (StatusCode::OK, json!({"ok": true})),
            _ => (
                StatusCode::OK,
                json!({"served_by": "monolith", "message": "the legacy shop: try /api/orders"}),
            ),
        })
    }
}

#[async_trait]
impl ServeHttp for Shop {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        match self.handle(session).await {
            Ok((status, body)) => respond(status, "monolith", &body),
            Err(e) => respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "monolith",
                &json!({"error": e.to_string()}),
            ),
        }
    }
}

/// The new orders service: reads only, from its own database, which `ficus sink` keeps in
/// step with the shop's orders (a read model: the same orders, `total` kept as `amount`).
pub struct Orders {
    pub db: Arc<tokio_postgres::Client>,
}

impl Orders {
    async fn handle(&self, path: &str) -> Result<(StatusCode, Value), tokio_postgres::Error> {
        // The shop's answer, from the service's own columns.
        const ORDER: &str =
            "json_build_object('id', id, 'customer_id', customer_id, 'item', item, \
            'quantity', quantity, 'total', amount::text, 'status', status)::text";
        let order = |text: String| serde_json::from_str::<Value>(&text).unwrap_or(Value::Null);
        Ok(match order_id(path) {
            Some(id) => {
                let sql = format!("SELECT {ORDER} FROM orders WHERE id = $1");
                match self.db.query_opt(&sql, &[&id]).await? {
                    Some(row) => (
                        StatusCode::OK,
                        json!({"served_by": "orders-service", "order": order(row.get(0))}),
                    ),
                    None => (
                        StatusCode::NOT_FOUND,
                        json!({"served_by": "orders-service", "error": "no such order"}),
                    ),
                }
            }
            None => {
                let rows =
                    self.db.query(&format!("SELECT {ORDER} FROM orders ORDER BY id"), &[]).await?;
                let orders: Vec<Value> = rows.iter().map(|r| order(r.get(0))).collect();
                (StatusCode::OK, json!({"served_by": "orders-service", "orders": orders}))
            }
        })
    }
}

#[async_trait]
impl ServeHttp for Orders {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        if path == "/healthz" {
            return respond(StatusCode::OK, "orders", &json!({"ok": true}));
        }
        match self.handle(&path).await {
            Ok((status, body)) => respond(status, "orders", &body),
            Err(e) => respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "orders",
                &json!({"error": e.to_string()}),
            ),
        }
    }
}

/// A consumer reading `topics` (one partition each) from the beginning, without a group.
pub fn consumer(brokers: &str, topics: &[&str]) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "ficus-demo")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        assignment.add_partition_offset(topic, 0, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}

/// Prints each CDC event as it arrives on Kafka.
pub async fn print_events(consumer: StreamConsumer) {
    loop {
        let Ok(message) = consumer.recv().await else { continue };
        let key = message.key().map(String::from_utf8_lossy).unwrap_or_default().to_string();
        match message.payload().and_then(|p| serde_json::from_slice::<Value>(p).ok()) {
            Some(event) => println!(
                "  [kafka {}] op={} key={key} after={}",
                message.topic(),
                event["op"].as_str().unwrap_or("?"),
                event["after"]
            ),
            None => println!("  [kafka {}] tombstone key={key}", message.topic()),
        }
    }
}

/// The orders service's own table, kept by `ficus sink` (see [`orders_sink`]).
pub const ORDERS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS orders (
  id int PRIMARY KEY,
  customer_id int NOT NULL,
  item text NOT NULL,
  quantity int NOT NULL,
  amount numeric(10,2) NOT NULL,
  status text NOT NULL,
  created_at timestamptz NOT NULL
);
";

/// The `ficus sink` configuration of the orders service's table, as a JSON value
/// (`{brokers}`, `{url}` and `{topic}` filled in).
pub fn orders_sink(brokers: &str, url: &str, topic: &str) -> Value {
    json!({
        "kafka": {"brokers": brokers, "name": "orders-service"},
        "postgres": {
            "url": url,
            "tables": [{"topic": topic, "table": "public.orders", "columns": {"total": "amount"}}],
        },
    })
}

/// The demo shop's schema and a few rows.
pub const SHOP_SCHEMA: &str = "
CREATE TABLE customers (id serial PRIMARY KEY, email text NOT NULL UNIQUE, name text NOT NULL);
CREATE TABLE orders (
  id serial PRIMARY KEY,
  customer_id int NOT NULL REFERENCES customers,
  item text NOT NULL,
  quantity int NOT NULL,
  total numeric(10,2) NOT NULL,
  status text NOT NULL DEFAULT 'placed',
  created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO customers (email, name) VALUES
  ('ada@example.com', 'Ada'), ('grace@example.com', 'Grace'), ('alan@example.com', 'Alan');
INSERT INTO orders (customer_id, item, quantity, total) VALUES
  (1, 'keyboard', 1, 49.90), (2, 'monitor', 2, 399.00), (3, 'mouse', 3, 59.70);
";
