//! Builds the application: store, runtime (with recovery), HTTP server;
//! then runs it until SIGTERM/SIGINT (or a programmatic stop) and shuts
//! down gracefully.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::{Server, ServerHandle};
use actix_web::{App, HttpServer, web};
use tokio_util::sync::CancellationToken;

use crate::access::AccessControl;
use crate::config::Config;
use crate::http::{self, AppState};
use crate::runtime::Directory;
use crate::runtime::executor::Executors;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot open the store")]
    Store(#[from] StoreError),
    #[error("cannot recover unfinished runs")]
    Recovery(#[source] crate::runtime::RegistryError),
    #[error("cannot listen on {bind}")]
    Bind {
        bind: String,
        #[source]
        source: std::io::Error,
    },
}

/// A built application, listening, not yet serving.
pub struct Application {
    port: u16,
    server: Server,
    directory: Directory,
    store: Store,
    config: Arc<Config>,
    stop: CancellationToken,
    /// The admin token made at the first start, to be shown once.
    first_token: Option<String>,
}

impl Application {
    /// Builds with the executors the configuration names.
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        let executors = Executors::from_config(&config);
        Self::build_with(config, executors).await
    }

    /// Builds with the given executors (library users compile in their own).
    pub async fn build_with(config: Config, executors: Executors) -> Result<Self, StartupError> {
        let config = Arc::new(config);
        // Installs the metrics recorder before anything records.
        crate::telemetry::metrics();
        let store = Store::open(&config.database).await?;
        let directory = Directory::new(store.clone(), config.clone(), executors);
        let recovered = directory.recover().await.map_err(StartupError::Recovery)?;
        if recovered > 0 {
            tracing::info!(runs = recovered, "resuming unfinished runs");
        }
        directory.start_heartbeat();
        tracing::info!(node_id = %directory.node_id(), "node started");
        let listener =
            TcpListener::bind(&config.server.bind).map_err(|source| StartupError::Bind {
                bind: config.server.bind.clone(),
                source,
            })?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let state = web::Data::new(AppState {
            directory: directory.clone(),
            config: config.clone(),
        });
        let access = AccessControl::new(&config.auth.admin_token, store.clone());
        let first_token = access.create_first_token().await?;
        let access = web::Data::new(access);
        let grace = config.server.shutdown_grace.0;
        let server = HttpServer::new(move || {
            App::new()
                .wrap(actix_web::middleware::from_fn(http::catch_panics))
                .configure(http::configure(state.clone(), access.clone()))
        })
        .disable_signals()
        .shutdown_timeout(grace.as_secs().max(1))
        .listen(listener)
        .map_err(|source| StartupError::Bind {
            bind: config.server.bind.clone(),
            source,
        })?
        .run();
        tracing::info!(bind = %config.server.bind, port, "listening");
        Ok(Self {
            port,
            server,
            directory,
            store,
            config,
            stop: CancellationToken::new(),
            first_token,
        })
    }

    /// The port the server listens on (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The admin token made at this first start (no admin token configured,
    /// none ever stored), to be shown to the operator once.
    pub fn take_first_token(&mut self) -> Option<String> {
        self.first_token.take()
    }

    /// Cancelling this token shuts the application down as a signal would.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Serves until SIGTERM, SIGINT or the stop token; then stops accepting,
    /// lets running items finish within the grace period, and closes the store.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let handle: ServerHandle = self.server.handle();
        let mut server = actix_rt::spawn(self.server);
        tokio::select! {
            result = &mut server => {
                return result.unwrap_or_else(|e| Err(std::io::Error::other(e)));
            }
            () = shutdown_signal() => tracing::info!("shutdown signal received"),
            () = self.stop.cancelled() => tracing::info!("shutdown requested"),
        }
        let grace = self.config.server.shutdown_grace.0;
        let (finished, _) = tokio::join!(self.directory.shutdown(grace), handle.stop(true));
        if !finished {
            tracing::warn!("grace period over; unfinished items resume at the next start");
        }
        self.store.close().await;
        let _ = server.await;
        tracing::info!("stopped");
        Ok(())
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
