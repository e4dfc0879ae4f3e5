//! A real browser for the pages: Debian's headless Chromium driven over
//! WebDriver (chromedriver) with fantoccini. Each test gets its own
//! chromedriver, profile and window; screenshots of the pages visited go to
//! `target/screenshots/<test>/`, at desktop and at phone width.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

pub struct Browser {
    pub client: Client,
    driver: Child,
    profile: PathBuf,
    shots: PathBuf,
    count: usize,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Browser {
    /// A browser for the test `name` (its screenshot folder).
    pub async fn start(name: &str) -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver must be installed: run ops/deps");
        let profile =
            std::env::temp_dir().join(format!("twofold-chromium-{}", uuid::Uuid::new_v4()));
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".to_string(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        let mut client = None;
        for _ in 0..300 {
            // chromedriver is on loopback: plain HTTP, no TLS stack needed.
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(c) => {
                    client = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let client = client.expect("chromedriver did not answer");
        let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/screenshots")
            .join(name);
        let _ = std::fs::remove_dir_all(&shots);
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            client,
            driver,
            profile,
            shots,
            count: 0,
        }
    }

    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    pub async fn find(&self, css: &str) -> Element {
        match self.client.find(Locator::Css(css)).await {
            Ok(found) => found,
            Err(e) => {
                let page = self.client.source().await.unwrap_or_default();
                panic!("no {css} on {}: {e}\n{page}", self.url().await)
            }
        }
    }

    pub async fn url(&self) -> String {
        self.client
            .current_url()
            .await
            .map(|u| u.to_string())
            .unwrap_or_default()
    }

    /// The visible text of the page's main content.
    pub async fn text(&self) -> String {
        self.find("main").await.text().await.unwrap()
    }

    pub async fn fill(&self, css: &str, value: &str) {
        let field = self.find(css).await;
        field.clear().await.unwrap();
        field.send_keys(value).await.unwrap();
    }

    /// Clicks the button or link whose text contains `label`, and waits
    /// for the page it leads to.
    pub async fn click_text(&self, label: &str) {
        let xpath = format!(
            "//button[contains(normalize-space(.), '{label}')] | //a[contains(normalize-space(.), '{label}')]"
        );
        let target = self
            .client
            .find(Locator::XPath(&xpath))
            .await
            .unwrap_or_else(|e| panic!("nothing to click named {label:?}: {e}"));
        self.navigating(target).await;
    }

    /// Clicks the element and waits for the page it leads to.
    pub async fn submit(&self, css: &str) {
        let target = self.find(css).await;
        self.navigating(target).await;
    }

    /// Clicks `target` and waits until the current document is replaced
    /// (its root element goes stale), so the next look is at the new page.
    async fn navigating(&self, target: Element) {
        let old = self.find("html").await;
        target.click().await.unwrap();
        // Up to 20 s: a loaded CI machine can be slow to answer.
        for _ in 0..800 {
            if old.tag_name().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "the page did not change after a click at {}",
            self.url().await
        );
    }

    /// Saves the page as `NN-name.png` at desktop width and
    /// `NN-name-phone.png` at 375 px.
    /// The whole page, not only what fits the window. Fails when the page is
    /// wider than the window at either width (it would scroll sideways).
    pub async fn shot(&mut self, name: &str) {
        self.count += 1;
        let base = format!("{:02}-{name}", self.count);
        for (suffix, width) in [("", 1280), ("-phone", 375)] {
            self.client.set_window_size(width, 900).await.unwrap();
            let height = self
                .client
                .execute("return document.documentElement.scrollHeight", vec![])
                .await
                .ok()
                .and_then(|v| v.as_u64())
                .unwrap_or(900)
                .clamp(600, 5000) as u32;
            self.client
                .set_window_size(width, height + 120)
                .await
                .unwrap();
            let png = self.client.screenshot().await.unwrap();
            std::fs::write(self.shots.join(format!("{base}{suffix}.png")), png).unwrap();
            let widths = self
                .client
                .execute(
                    "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]",
                    vec![],
                )
                .await
                .unwrap();
            let (page, window) = (widths[0].as_u64().unwrap(), widths[1].as_u64().unwrap());
            assert!(
                page <= window,
                "{base}{suffix}: the page is {page} px wide in a {window} px window"
            );
        }
        self.client.set_window_size(1280, 900).await.unwrap();
    }

    pub async fn stop(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
