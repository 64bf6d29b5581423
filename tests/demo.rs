//! `ficus demo`, the README's first command, run as a newcomer would: it tells the whole
//! story, keeps running, and cleans up everything on Ctrl-C.

mod common;

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn the_demo_tells_the_whole_story_and_cleans_up_on_ctrl_c() {
    let dir = tempfile::tempdir().expect("dir");
    let demo_dir = dir.path().join("demo");
    let (listen, admin) = (common::free_addr().to_string(), common::free_addr().to_string());
    let mut child = common::ficus()
        .args([
            "demo",
            "--listen",
            &listen,
            "--admin",
            &admin,
            "--dir",
            demo_dir.to_str().expect("path"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn demo");
    let mut stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut output = String::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !output.contains("Ctrl-C stops the demo") {
        assert!(Instant::now() < deadline, "the demo did not finish its story:\n{output}");
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
            output.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    // The snapshot and the new orders arrive as CDC events read back from Kafka, printed by
    // their own consumer, which may print the last ones after the story's end.
    while !output.contains("[kafka shop.public.orders] op=c") && Instant::now() < deadline {
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
            output.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    assert!(output.contains("[kafka shop.public.orders] op=r"), "{output}");
    assert!(output.contains("[kafka shop.public.orders] op=c"), "{output}");
    assert!(output.contains("-> monolith: order 4"), "{output}");
    // The new service's own database has the new orders through ficus cdc and ficus sink.
    assert!(output.contains("put them in the orders service's own database"), "{output}");
    // Reads are split between both backends, and the new service knows order 4.
    assert!(output.contains("-> orders   \"cable\""), "{output}");
    assert!(output.contains("-> monolith \"cable\""), "{output}");
    assert!(demo_dir.join("postgres").exists());

    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("wait") {
            break exit;
        }
        assert!(Instant::now() < deadline, "the demo did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
    assert!(!demo_dir.join("postgres").exists(), "the demo's database is removed");
    assert!(std::net::TcpStream::connect(&listen).is_err(), "the proxy is gone");
}
