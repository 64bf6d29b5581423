//! `ficus demo`: the whole story on one machine, until Ctrl-C. A throwaway PostgreSQL with a
//! small shop schema, the legacy shop app and the new orders service, `ficus proxy` in front
//! of them sending a share of `/api/orders` reads to the new service, `ficus cdc`
//! streaming the shop's changes into Kafka, and `ficus sink` keeping the new service's own
//! database in step with them.

mod apps;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use ficus_cdc::config::{CdcConfig, KafkaConfig, MetricsConfig, SnapshotMode, SourceConfig};
use ficus_proxy::ProxySettings;
use pingora::services::listening::Service;
use rdkafka::mocking::MockCluster;

use self::apps::{Orders, Shop, ORDERS_SCHEMA, SHOP_SCHEMA};
use crate::pg_cluster::PgCluster;

#[derive(Args)]
pub struct DemoArgs {
    /// Address of the proxy.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: String,
    /// Address of the proxy's admin API.
    #[arg(long, default_value = "127.0.0.1:9901")]
    admin: String,
    /// A real Kafka cluster to use instead of the embedded mock cluster.
    #[arg(long)]
    brokers: Option<String>,
    /// Directory for the demo's files (route file, database); a temporary one by default.
    #[arg(long)]
    dir: Option<PathBuf>,
}

const ROUTES: &str = r#"# ficus demo route file: change `percent` and save; the proxy reloads it live.
[backends.monolith]
url = "http://{shop}"

[backends.orders]
url = "http://{orders}"
health = { path = "/healthz", interval = "2s" }

[defaults]
backend = "monolith"
sticky = "header:x-user-id"
override = { header = "x-ficus-backend", allow = ["127.0.0.1/32", "::1/128"] }

# Reads of orders move to the new service; writes stay on the monolith, and reach the new
# service through CDC.
[[routes]]
name = "orders-read"
match = { path_prefix = "/api/orders", methods = ["GET"] }
to = "orders"
percent = 50
"#;

pub fn run(args: &DemoArgs) -> Result<i32> {
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("ficus-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    // Kafka consumers attach to the runtime they are created in.
    let _entered = runtime.enter();

    println!("ficus demo: starting PostgreSQL, Kafka, the shop, the orders service, ficus proxy, ficus cdc and ficus sink...");
    let pg = PgCluster::start(&dir.join("postgres"), free_port()?, &[])?;
    // The shop's database, and the orders service's own (on the same server, for brevity).
    let (db, orders_db) = runtime.block_on(async {
        let connect = |url: String| async move {
            let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            Ok::<_, tokio_postgres::Error>(db)
        };
        let admin = connect(pg.url("postgres")).await?;
        // One statement each: CREATE DATABASE does not run in a transaction.
        admin.batch_execute("CREATE DATABASE shop").await?;
        admin.batch_execute("CREATE DATABASE orders").await?;
        let db = connect(pg.url("shop")).await?;
        db.batch_execute(SHOP_SCHEMA).await?;
        let orders_db = connect(pg.url("orders")).await?;
        orders_db.batch_execute(ORDERS_SCHEMA).await?;
        Ok::<_, tokio_postgres::Error>((db, orders_db))
    })?;

    // The embedded Kafka lives on this thread for as long as the demo runs.
    let mock = match &args.brokers {
        Some(_) => None,
        None => Some(MockCluster::new(1).context("cannot start the embedded Kafka mock cluster")?),
    };
    let brokers = match (&args.brokers, &mock) {
        (Some(brokers), _) => brokers.clone(),
        (None, Some(mock)) => {
            for table in ["customers", "orders"] {
                mock.create_topic(&format!("shop.public.{table}"), 1, 1)?;
            }
            mock.bootstrap_servers()
        }
        (None, None) => unreachable!("a mock cluster exists when no brokers are given"),
    };

    let (shop_addr, orders_addr) =
        (format!("127.0.0.1:{}", free_port()?), format!("127.0.0.1:{}", free_port()?));
    let routes = dir.join("routes.toml");
    std::fs::write(
        &routes,
        ROUTES.replace("{shop}", &shop_addr).replace("{orders}", &orders_addr),
    )?;

    let (stop_cdc, cdc_shutdown) = tokio::sync::watch::channel(ficus_cdc::Shutdown::Run);
    let cdc_config = CdcConfig {
        source: SourceConfig {
            url: pg.url("shop"),
            publication: "ficus".into(),
            slot: "ficus".into(),
            tables: Some(vec!["public.customers".into(), "public.orders".into()]),
            snapshot: SnapshotMode::Initial,
            heartbeat: Duration::from_secs(1),
            time_precision: Default::default(),
            transaction_metadata: false,
            snapshot_chunk_rows: 8192,
        },
        kafka: KafkaConfig {
            brokers: brokers.clone(),
            topic_prefix: "shop".into(),
            partitions: 1,
            replication_factor: 1,
            max_in_flight: 10_000,
            producer: BTreeMap::new(),
        },
        metrics: MetricsConfig::default(),
        columns: BTreeMap::new(),
        masking: Default::default(),
        outbox: Vec::new(),
        output: ficus_cdc::config::Output::Kafka,
    };
    runtime.spawn(async move {
        if let Err(e) = ficus_cdc::run(cdc_config, ficus_cdc::Metrics::new(), cdc_shutdown).await {
            eprintln!("ficus cdc stopped: {e}");
        }
    });
    let sink_config = apps::orders_sink(&brokers, &pg.url("orders"), "shop.public.orders");
    let sink_config = ficus_sink::SinkConfig::from_value(sink_config)
        .map_err(|problems| anyhow::anyhow!("the demo's sink: {}", problems.join("; ")))?;
    let (stop_sink, sink_shutdown) = tokio::sync::watch::channel(false);
    runtime.spawn(async move {
        let metrics = ficus_sink::Metrics::new();
        if let Err(e) = ficus_sink::run(sink_config, metrics, sink_shutdown).await {
            eprintln!("ficus sink stopped: {e}");
        }
    });
    runtime.spawn(apps::print_events(apps::consumer(
        &brokers,
        &["shop.public.customers", "shop.public.orders"],
    )?));
    let story = Story {
        proxy: args.listen.clone(),
        admin: args.admin.clone(),
        routes: routes.clone(),
        brokers: brokers.clone(),
    };
    runtime.spawn(async move {
        if let Err(e) = story.tell().await {
            eprintln!("demo traffic failed: {e:#}");
        }
    });

    let settings = ProxySettings {
        listen: args.listen.clone(),
        admin: args.admin.clone(),
        threads: 2,
        shutdown_grace: Duration::from_secs(0),
        ..ProxySettings::with_routes(routes)
    };
    let db = Arc::new(db);
    ficus_proxy::run_with(settings, |server| {
        let mut shop = Service::new("demo shop".into(), Shop { db });
        shop.add_tcp(&shop_addr);
        server.add_service(shop);
        let mut orders = Service::new("demo orders".into(), Orders { db: Arc::new(orders_db) });
        orders.add_tcp(&orders_addr);
        server.add_service(orders);
    })?;

    println!("\nficus demo: stopping and cleaning up {}", dir.display());
    let _ = stop_cdc.send(ficus_cdc::Shutdown::Stop);
    let _ = stop_sink.send(true);
    runtime.shutdown_timeout(Duration::from_secs(5));
    drop(pg);
    drop(mock);
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(0)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?.local_addr()?.port())
}

/// The traffic the demo sends and what it prints about it.
struct Story {
    proxy: String,
    admin: String,
    routes: PathBuf,
    brokers: String,
}

impl Story {
    async fn tell(&self) -> Result<()> {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.get(format!("http://{}/healthz", self.admin)).send().await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "the proxy did not start within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let base = format!("http://{}", self.proxy);
        println!("\nCDC events, consumed from Kafka as they arrive (the snapshot of existing rows first):");
        tokio::time::sleep(Duration::from_secs(2)).await;

        println!("\n1. Writes go to the monolith (POST is not part of the route):");
        for (customer, item) in [(1, "cable"), (2, "laptop"), (3, "desk")] {
            let response = client
                .post(format!("{base}/api/orders"))
                .json(&serde_json::json!({"customer_id": customer, "item": item, "quantity": 1}))
                .send()
                .await?;
            let backend = header(&response, "x-backend");
            let body: serde_json::Value = response.json().await?;
            println!("   POST /api/orders {item:<7} -> {backend}: order {}", body["order"]["id"]);
        }
        // The new service learns of the orders only through CDC and the sink: wait until its
        // database has the last one.
        let written = Instant::now();
        let deadline = written + Duration::from_secs(60);
        loop {
            let response = client
                .get(format!("{base}/api/orders/6"))
                .header("x-ficus-backend", "orders")
                .send()
                .await?;
            if response.status().is_success() {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "the orders service never received order 6");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "   ficus cdc, Kafka and ficus sink put them in the orders service's own database {} ms after the writes",
            written.elapsed().as_millis()
        );

        println!(
            "\n2. Reads of /api/orders/4 by 10 users; 50% of users go to the new orders service,"
        );
        println!("   which answers from its own database, a read model `ficus sink` keeps:");
        for user in 1..=10 {
            let response = client
                .get(format!("{base}/api/orders/4"))
                .header("x-user-id", format!("user-{user}"))
                .send()
                .await?;
            let backend = header(&response, "x-backend");
            let body: serde_json::Value = response.json().await?;
            println!("   x-user-id: user-{user:<3} -> {backend:<8} {}", body["order"]["item"]);
        }

        println!("\nTry next:");
        println!("  curl -s -H 'x-user-id: alice' http://{}/api/orders/1", self.proxy);
        println!("  curl -s -X POST -d '{{\"customer_id\":1,\"item\":\"lamp\",\"quantity\":1}}' http://{}/api/orders", self.proxy);
        println!(
            "  $EDITOR {}    # set percent = 100, save: every read moves to the new service",
            self.routes.display()
        );
        println!(
            "  ficus routes explain {} GET /api/orders/1 -H 'x-user-id: alice'",
            self.routes.display()
        );
        println!(
            "  curl -s http://{}/routes; curl -s http://{}/metrics | grep ^ficus_",
            self.admin, self.admin
        );
        println!("  Kafka bootstrap address for any client: {}   (topics shop.public.orders, shop.public.customers)", self.brokers);
        println!("Ctrl-C stops the demo and removes everything it started.\n");
        Ok(())
    }
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string()
}

/// `ficus sample shop|orders`: one of the demo's sample services on its own, as the compose
/// file runs them.
#[derive(Args)]
pub struct SampleArgs {
    #[arg(value_enum)]
    app: SampleApp,
    /// Address to serve on.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: String,
    /// The shop's database (for `shop`).
    #[arg(long, env = "SHOP_DATABASE_URL")]
    database: Option<String>,
    /// The orders service's own database (for `orders`; `ficus sink` keeps its `orders`
    /// table in step with the shop's).
    #[arg(long, env = "ORDERS_DATABASE_URL")]
    orders_database: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SampleApp {
    /// The legacy monolith: orders read from and written to PostgreSQL.
    Shop,
    /// The new orders service: orders from its own database, kept by `ficus sink`.
    Orders,
}

pub fn run_sample(args: &SampleArgs) -> Result<i32> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let _entered = runtime.enter();
    let mut server = pingora::server::Server::new_with_opt_and_conf(None, Default::default());
    server.bootstrap();
    match args.app {
        SampleApp::Shop => {
            let url = args
                .database
                .as_deref()
                .context("--database (or SHOP_DATABASE_URL) is required")?;
            let db = runtime
                .block_on(async {
                    let (db, connection) =
                        tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
                    tokio::spawn(connection);
                    // Create the schema on first start.
                    let exists = db
                        .query_opt("SELECT 1 FROM pg_class WHERE relname = 'orders'", &[])
                        .await?;
                    if exists.is_none() {
                        db.batch_execute(SHOP_SCHEMA).await?;
                    }
                    Ok::<_, tokio_postgres::Error>(db)
                })
                .with_context(|| format!("cannot use the shop database {url}"))?;
            let mut service = Service::new("sample shop".into(), Shop { db: Arc::new(db) });
            service.add_tcp(&args.listen);
            server.add_service(service);
        }
        SampleApp::Orders => {
            let url = args
                .orders_database
                .as_deref()
                .context("--orders-database (or ORDERS_DATABASE_URL) is required")?;
            let db = runtime
                .block_on(async {
                    let (db, connection) =
                        tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
                    tokio::spawn(connection);
                    // Its table, for `ficus sink` to fill.
                    db.batch_execute(ORDERS_SCHEMA).await?;
                    Ok::<_, tokio_postgres::Error>(db)
                })
                .with_context(|| format!("cannot use the orders database {url}"))?;
            let mut service = Service::new("sample orders".into(), Orders { db: Arc::new(db) });
            service.add_tcp(&args.listen);
            server.add_service(service);
        }
    }
    println!("serving on {}", args.listen);
    server.run(pingora::server::RunArgs::default());
    Ok(0)
}
