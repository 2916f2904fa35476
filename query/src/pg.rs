//! The Postgres wire protocol on the query service, so BI tools (Metabase,
//! Grafana, Superset) and `psql` connect: user = key name, password = API key,
//! and the same role rules as `/v1/sql` (engineers read every table, analysts
//! aggregate the rollups under the k rule). Everything is read-only; the
//! catalog (`pg_catalog`, `information_schema`) lists only what the role may read.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use arrow::datatypes::{DataType, SchemaRef};
use arrow_pg::datatypes::{arrow_schema_to_pg_fields, encode_recordbatch, into_pg_type};
use async_trait::async_trait;
use datafusion::common::ParamValues;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use futures::Sink;
use futures::stream;
use marsad_config::Role;
use pgwire::api::auth::sasl::scram::{ScramServerAuth, ScramServerAuthWaitingForClientFinal};
use pgwire::api::auth::{
    DefaultServerParameterProvider, LoginInfo, Password, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, PgWireConnectionState, PgWireServerHandlers, PidSecretKeyGenerator,
    RandomPidSecretKeyGenerator, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::response::NoticeResponse;
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::QueryState;
use crate::catalog::TableScope;
use crate::error::ApiError;
use crate::pg_compat::SERVER_VERSION;
use crate::sql::{self, Access};

/// The catalog name clients see (`current_database()`).
const DATABASE: &str = "marsad";
/// Where a connection's access is kept once its key is checked.
const ACCESS_KEY: &str = "marsad.access";

fn user_error(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new("ERROR".into(), code.into(), message.into())))
}

/// An answer of the SQL layer as a Postgres error with a fitting SQLSTATE.
fn pg_error(e: ApiError) -> PgWireError {
    let message = e.to_string();
    let code = match &e {
        ApiError::BadRequest(m) if m.contains("read-only") => "25006",
        ApiError::BadRequest(m) if m.contains("analyst SQL") => "42501",
        ApiError::BadRequest(m) if m.contains("memory") => "53200",
        ApiError::BadRequest(_) => "42000",
        ApiError::Timeout(_) => "57014",
        ApiError::Access(_) => "42501",
        _ => "XX000",
    };
    user_error(code, message)
}

/// What a signed-in connection may read.
#[derive(Debug, Clone)]
struct Grant {
    access: Access,
    scope: TableScope,
}

impl Grant {
    fn of(client: &(impl ClientInfo + ?Sized), mechanism: crate::release::Mechanism) -> PgWireResult<Self> {
        match client.metadata().get(ACCESS_KEY).map(String::as_str) {
            Some("engineer") => Ok(Grant {
                access: Access::Everything,
                scope: TableScope::All,
            }),
            Some("analyst") => Ok(Grant {
                access: Access::Released {
                    key: client
                        .metadata()
                        .get(pgwire::api::METADATA_USER)
                        .cloned()
                        .unwrap_or_default(),
                    mechanism,
                },
                scope: TableScope::Rollups,
            }),
            _ => Err(user_error("28000", "not signed in")),
        }
    }
}

/// Checks the password (an API key) against the user (its name) and the key's roles: by
/// SCRAM-SHA-256 when this process knows the key's verifier (key files, the admin key), so
/// the key never crosses the wire; else as a password, and then only over TLS when TLS is
/// configured.
struct KeyAuth {
    state: QueryState,
    parameters: DefaultServerParameterProvider,
    pids: RandomPidSecretKeyGenerator,
    /// Whether this server offers TLS: then no password crosses a plain connection.
    tls: bool,
    /// SCRAM exchanges between their first and final message, by client address.
    scram: std::sync::Mutex<std::collections::HashMap<std::net::SocketAddr, ScramServerAuthWaitingForClientFinal>>,
}

fn fatal(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new("FATAL".into(), code.into(), message)))
}

impl KeyAuth {
    fn refuse(&self, user: &str) -> PgWireError {
        self.state.metrics.count("pg_auth_refused");
        tracing::info!(user = %user, "postgres sign-in refused");
        PgWireError::InvalidPassword(user.to_owned())
    }

    /// Signs in `user` (whose key was proven) if its key may query.
    async fn sign_in<C>(&self, client: &mut C, user: &str) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let Some(holder) = self.state.keys.holder_named(user).cloned() else {
            return Err(self.refuse(user));
        };
        let access = if holder.roles.contains(&Role::Engineer) {
            "engineer"
        } else if holder.roles.contains(&Role::Analyst) {
            "analyst"
        } else {
            return Err(fatal(
                "42501",
                format!("key `{user}` has neither the engineer nor the analyst role"),
            ));
        };
        client.metadata_mut().insert(ACCESS_KEY.into(), access.into());
        let (pid, secret) = self.pids.generate(client);
        client.set_pid_and_secret_key(pid, secret);
        tracing::info!(user = %user, access, "postgres client signed in");
        finish_authentication(client, &self.parameters).await
    }
}

#[async_trait]
impl StartupHandler for KeyAuth {
    async fn on_startup<C>(&self, client: &mut C, message: PgWireFrontendMessage) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        use futures::SinkExt;
        fn user<C: ClientInfo>(client: &C) -> String {
            LoginInfo::from_client_info(client)
                .user()
                .unwrap_or_default()
                .to_owned()
        }
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                if self.tls && !client.is_secure() {
                    self.state.metrics.count("pg_plaintext_refused");
                    return Err(fatal(
                        "28000",
                        "this server takes API keys only over TLS: connect with sslmode=require".into(),
                    ));
                }
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                let scram = self.state.keys.scram_verifier(&user(client)).is_some();
                let method = if scram {
                    Authentication::SASL(vec!["SCRAM-SHA-256".to_owned()])
                } else {
                    Authentication::CleartextPassword
                };
                client.send(PgWireBackendMessage::Authentication(method)).await?;
            }
            PgWireFrontendMessage::PasswordMessageFamily(msg) => {
                let user = user(client);
                let peer = client.socket_addr();
                let verifier = self.state.keys.scram_verifier(&user).cloned();
                let Some(verifier) = verifier else {
                    let password = msg.into_password()?;
                    let holder = self.state.keys.holder_of(password.password.trim()).cloned();
                    if holder.is_none_or(|h| h.name != user) {
                        return Err(self.refuse(&user));
                    }
                    return self.sign_in(client, &user).await;
                };
                let waiting = self.scram.lock().ok().and_then(|mut m| m.remove(&peer));
                match waiting {
                    None => {
                        let first = msg.into_sasl_initial_response()?;
                        if first.auth_method != "SCRAM-SHA-256" {
                            return Err(fatal("28000", "use SCRAM-SHA-256".into()));
                        }
                        let data = first.data.as_ref().map(|d| d.to_vec()).unwrap_or_default();
                        let expected = Password::new(Some(verifier.salt.to_vec()), verifier.salted_password.to_vec());
                        let mut server = ScramServerAuth::new();
                        server.set_iterations(marsad_privacy::access::SCRAM_ITERATIONS as usize);
                        let (server_first, next) = server.on_client_first_message(&data, expected)?;
                        if let Ok(mut m) = self.scram.lock() {
                            m.insert(peer, next);
                        }
                        client
                            .send(PgWireBackendMessage::Authentication(Authentication::SASLContinue(
                                server_first.into_bytes().into(),
                            )))
                            .await?;
                    }
                    Some(waiting) => {
                        let last = msg.into_sasl_response()?;
                        let Ok(server_final) = waiting.on_client_final_message(&last.data) else {
                            return Err(self.refuse(&user));
                        };
                        client
                            .send(PgWireBackendMessage::Authentication(Authentication::SASLFinal(
                                server_final.into_bytes().into(),
                            )))
                            .await?;
                        self.sign_in(client, &user).await?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// A statement as the extended protocol keeps it between Parse and Execute.
#[derive(Debug, Clone)]
pub enum PgStatement {
    /// A query, planned once at Parse for its result columns and parameter types.
    Query {
        /// The SQL, rewritten into what DataFusion understands.
        sql: String,
        /// The result columns.
        schema: SchemaRef,
        /// `$1`, `$2`, … types as inferred from the plan.
        params: Vec<Option<DataType>>,
    },
    /// A session command answered without touching data (SET, SHOW, BEGIN, …).
    Command(Command),
}

/// Session commands BI tools send, answered without touching data.
#[derive(Debug, Clone)]
pub enum Command {
    /// `SET …`, `DISCARD …`, `DEALLOCATE …`: accepted and ignored (the session is read-only).
    Ignored(&'static str),
    /// `SHOW name`.
    Show(String),
    /// `BEGIN` / `START TRANSACTION`.
    Begin,
    /// `COMMIT` (nothing was written).
    Commit,
    /// `ROLLBACK`.
    Rollback,
}

fn command_of(statement: &Statement) -> Option<Command> {
    Some(match statement {
        Statement::Set(_) => Command::Ignored("SET"),
        Statement::Discard { .. } => Command::Ignored("DISCARD ALL"),
        Statement::Deallocate { .. } => Command::Ignored("DEALLOCATE"),
        Statement::ShowVariable { variable } => Command::Show(
            variable
                .iter()
                .map(|i| i.value.to_ascii_lowercase())
                .collect::<Vec<_>>()
                .join(" "),
        ),
        Statement::StartTransaction { .. } => Command::Begin,
        Statement::Commit { .. } => Command::Commit,
        // a savepoint in a read-only session has nothing to keep: psycopg 3 and SQLAlchemy set
        // them around their catalog queries
        Statement::Savepoint { .. } => Command::Ignored("SAVEPOINT"),
        Statement::ReleaseSavepoint { .. } => Command::Ignored("RELEASE"),
        Statement::Rollback { savepoint: Some(_), .. } => Command::Ignored("ROLLBACK"),
        Statement::Rollback { .. } => Command::Rollback,
        _ => return None,
    })
}

/// The values `SHOW` answers: what clients ask before they query.
fn show(name: &str) -> PgWireResult<(String, String)> {
    let value = match name {
        "server_version" => SERVER_VERSION,
        "server_version_num" => "160006",
        "transaction isolation level" | "transaction_isolation" => "read committed",
        "standard_conforming_strings" => "on",
        "client_encoding" | "server_encoding" => "UTF8",
        "search_path" => "public",
        "timezone" | "time zone" => "UTC",
        "datestyle" => "ISO, YMD",
        "intervalstyle" => "postgres",
        "max_identifier_length" => "63",
        "default_transaction_read_only" | "transaction_read_only" => "on",
        "integer_datetimes" => "on",
        "lc_collate" | "lc_ctype" => "C.UTF-8",
        other => {
            return Err(user_error(
                "42704",
                format!("unrecognized configuration parameter \"{other}\""),
            ));
        }
    };
    Ok((name.replace(' ', "_"), value.to_owned()))
}

fn command_response(command: &Command) -> PgWireResult<Response> {
    Ok(match command {
        Command::Ignored(tag) => Response::Execution(Tag::new(tag)),
        Command::Begin => Response::TransactionStart(Tag::new("BEGIN")),
        Command::Commit => Response::TransactionEnd(Tag::new("COMMIT")),
        Command::Rollback => Response::TransactionEnd(Tag::new("ROLLBACK")),
        Command::Show(name) => {
            let (column, value) = show(name)?;
            let fields = Arc::new(vec![FieldInfo::new(column, None, None, Type::TEXT, FieldFormat::Text)]);
            let mut row = DataRowEncoder::new(fields.clone());
            row.encode_field(&value)?;
            let rows = vec![Ok(row.take_row())];
            Response::Query(QueryResponse::new(fields, stream::iter(rows)))
        }
    })
}

/// Answers queries of signed-in clients through the same SQL layer as `/v1/sql`.
pub struct PgService {
    state: QueryState,
    parser: Arc<PgParser>,
    activity: Arc<Activity>,
}

/// Parses with the Postgres compatibility rewrites (so `psql`'s catalog queries run) and plans
/// each query once for the extended protocol's Describe.
pub struct PgParser {
    state: QueryState,
    sql: PostgresCompatibilityParser,
}

impl PgParser {
    fn statements(&self, query: &str) -> PgWireResult<Vec<Statement>> {
        crate::bounded_dialect::check_postgres(query).map_err(pg_error)?;
        crate::pg_compat::parse(&self.sql, query).map_err(|e| user_error("42601", format!("syntax error: {e}")))
    }
}

/// A connection's DataFusion session, kept for its life so the catalog's object ids stay the
/// same between queries (`psql`'s `\d` looks a table's oid up, then its columns by that oid).
#[derive(Default)]
struct ConnectionSession(tokio::sync::Mutex<Option<SessionContext>>);

fn internal(what: &str, e: impl std::fmt::Display) -> PgWireError {
    tracing::error!(error = %e, "{what}");
    user_error("XX000", "internal error; see the service log")
}

/// The connection's session over the tables `grant` may read, at their latest versions, with the
/// Postgres catalog on top.
async fn context(
    state: &QueryState,
    client: &(impl ClientInfo + ?Sized),
    grant: Grant,
) -> PgWireResult<SessionContext> {
    let kept = client
        .session_extensions()
        .get_or_insert_with(ConnectionSession::default);
    let mut kept = kept.0.lock().await;
    let ctx = match kept.as_ref() {
        Some(ctx) => ctx.clone(),
        None => {
            let ctx = state
                .catalog
                .empty_session()
                .map_err(|e| internal("could not open a session", e))?;
            datafusion_pg_catalog::pg_catalog::setup_pg_catalog(&ctx, DATABASE, EmptyContextProvider)
                .map_err(|e| internal("could not set up pg_catalog", e))?;
            crate::pg_compat::register_functions(&ctx);
            *kept = Some(ctx.clone());
            ctx
        }
    };
    state
        .catalog
        .refresh(&ctx, grant.scope)
        .await
        .map_err(|e| internal("could not open the tables", e))?;
    Ok(ctx)
}

#[async_trait]
impl QueryParser for PgParser {
    type Statement = PgStatement;

    async fn parse_sql<C>(&self, client: &C, sql: &str, _types: &[Option<Type>]) -> PgWireResult<Option<PgStatement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut statements = self.statements(sql)?;
        if statements.len() > 1 {
            return Err(user_error("42601", "one statement per prepared statement"));
        }
        let Some(statement) = statements.pop() else {
            return Ok(None);
        };
        if let Some(command) = command_of(&statement) {
            return Ok(Some(PgStatement::Command(command)));
        }
        let grant = Grant::of(client, self.state.release.for_analysts())?;
        let released = matches!(grant.access, Access::Released { .. });
        let ctx = context(&self.state, client, grant).await?;
        let sql = statement.to_string();
        let df = sql::plan(&ctx, &sql, sql::read_only()).await.map_err(pg_error)?;
        let mut params: BTreeMap<usize, Option<DataType>> = BTreeMap::new();
        for (name, field) in df
            .logical_plan()
            .get_parameter_fields()
            .map_err(|e| pg_error(sql::user_error(e)))?
        {
            let n = name.trim_start_matches('$').parse::<usize>().unwrap_or(usize::MAX);
            params.insert(n, field.map(|f| f.data_type().clone()));
        }
        let mut schema = df.schema().inner().clone();
        if released {
            schema = sql::released_schema(&schema);
        }
        Ok(Some(PgStatement::Query {
            sql,
            schema,
            params: params.into_values().collect(),
        }))
    }

    fn get_parameter_types(&self, stmt: &PgStatement) -> PgWireResult<Vec<Type>> {
        match stmt {
            PgStatement::Query { params, .. } => Ok(params
                .iter()
                .map(|t| t.as_ref().and_then(|t| into_pg_type(t).ok()).unwrap_or(Type::UNKNOWN))
                .collect()),
            PgStatement::Command(_) => Ok(Vec::new()),
        }
    }

    fn get_result_schema(&self, stmt: &PgStatement, column_format: Option<&Format>) -> PgWireResult<Vec<FieldInfo>> {
        match stmt {
            PgStatement::Query { schema, .. } => {
                arrow_schema_to_pg_fields(schema, column_format.unwrap_or(&Format::UnifiedText), None)
            }
            PgStatement::Command(Command::Show(name)) => {
                let (column, _) = show(name)?;
                Ok(vec![FieldInfo::new(column, None, None, Type::TEXT, FieldFormat::Text)])
            }
            PgStatement::Command(_) => Ok(Vec::new()),
        }
    }
}

impl PgService {
    /// Runs one query as `client` may, and encodes the rows in `format`.
    async fn run<C>(
        &self,
        client: &mut C,
        sql: &str,
        params: Option<ParamValues>,
        format: &Format,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        use futures::SinkExt;
        let state = &self.state;
        let grant = Grant::of(client, state.release.for_analysts())?;
        let ctx = context(state, client, grant.clone()).await?;
        let result = state
            .run_sql(&ctx, sql, params, &grant.access)
            .await
            .map_err(pg_error)?;
        let mut notices = Vec::new();
        if let Some(r) = &result.release
            && r.mechanism == crate::release::Mechanism::Noise
        {
            let intervals: Vec<String> = r.ci95.iter().map(|(c, w)| format!("{c} ±{w}")).collect();
            notices.push(format!(
                "numbers are released with noise (95% intervals: {}); rows under {} visitors are left out; \
                 this answer spent ε {:.2}",
                intervals.join(", "),
                state.release.min_visitors(),
                r.epsilon_spent
            ));
        }
        if result.truncated {
            notices.push(format!(
                "the answer was cut at {} rows (query.max_result_rows)",
                state.max_rows
            ));
        }
        for notice in notices {
            let info = ErrorInfo::new("NOTICE".into(), "01000".into(), notice);
            client
                .send(PgWireBackendMessage::NoticeResponse(NoticeResponse::from(info)))
                .await?;
        }
        let fields = Arc::new(arrow_schema_to_pg_fields(&result.schema, format, None)?);
        let mut rows = Vec::new();
        for batch in result.batches {
            rows.extend(encode_recordbatch(fields.clone(), batch));
        }
        Ok(Response::Query(QueryResponse::new(fields, stream::iter(rows))))
    }
}

#[async_trait]
impl SimpleQueryHandler for PgService {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        self.activity.touch(client.socket_addr());
        let statements = self.parser.statements(query)?;
        if statements.is_empty() {
            return Ok(vec![Response::EmptyQuery]);
        }
        let mut out = Vec::new();
        for statement in statements {
            let response = match command_of(&statement) {
                Some(command) => command_response(&command),
                None => {
                    self.run(client, &statement.to_string(), None, &Format::UnifiedText)
                        .await
                }
            };
            match response {
                Ok(r) => out.push(r),
                // later statements of the string are not run after an error, as in Postgres
                Err(PgWireError::UserError(info)) => {
                    out.push(Response::Error(info));
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl ExtendedQueryHandler for PgService {
    type Statement = PgStatement;
    type QueryParser = PgParser;

    fn query_parser(&self) -> Arc<PgParser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<PgStatement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = PgStatement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        self.activity.touch(client.socket_addr());
        match &portal.statement.statement {
            PgStatement::Command(command) => command_response(command),
            PgStatement::Query { sql, params, .. } => {
                let types: Vec<Option<&DataType>> = params.iter().map(Option::as_ref).collect();
                let values = arrow_pg::datatypes::df::deserialize_parameters(portal, &types)?;
                let values = (!params.is_empty()).then_some(values);
                self.run(client, sql, values, &portal.result_column_format).await
            }
        }
    }
}

/// The handlers of one Postgres server.
pub struct PgHandlers {
    service: Arc<PgService>,
    auth: Arc<KeyAuth>,
    activity: Arc<Activity>,
}

impl PgHandlers {
    /// Handlers answering from `state`; `tls` says whether the server offers TLS (then no
    /// password is taken over a plain connection).
    pub fn new(state: QueryState, tls: bool) -> Self {
        let mut parameters = DefaultServerParameterProvider::default();
        parameters.server_version = format!("{SERVER_VERSION} (Marsad)");
        parameters.is_superuser = false;
        parameters.default_transaction_read_only = true;
        let parser = Arc::new(PgParser {
            state: state.clone(),
            sql: PostgresCompatibilityParser::new(),
        });
        let activity = Arc::new(Activity::default());
        PgHandlers {
            activity: activity.clone(),
            service: Arc::new(PgService {
                state: state.clone(),
                parser,
                activity,
            }),
            auth: Arc::new(KeyAuth {
                state,
                parameters,
                pids: RandomPidSecretKeyGenerator::default(),
                tls,
                scram: Default::default(),
            }),
        }
    }
}

impl PgWireServerHandlers for PgHandlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.service.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.service.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.auth.clone()
    }
}

/// Serves the Postgres wire protocol on `listener` until `shutdown`, at most
/// `max_connections` at once (later ones wait for a free slot); TLS from `tls` (reloaded with
/// its files); a connection silent for `idle_timeout` is closed, freeing its slot.
pub async fn serve_pg(
    listener: TcpListener,
    state: QueryState,
    tls: Option<Arc<marsad_net::TlsFiles>>,
    max_connections: usize,
    idle_timeout: std::time::Duration,
    shutdown: CancellationToken,
) {
    let handlers = Arc::new(PgHandlers::new(state, tls.is_some()));
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, tls = tls.is_some(), "postgres protocol listening");
    }
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => return,
            slot = slots.clone().acquire_owned() => match slot { Ok(s) => s, Err(_) => return },
        };
        let (socket, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "postgres accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let handlers = handlers.clone();
        // the HTTP listeners' protocols are not offered here: libpq 17 sends ALPN `postgresql`
        let acceptor = tls.as_ref().map(|t| {
            let mut config = (*t.server_config()).clone();
            config.alpn_protocols.clear();
            pgwire::tokio::TlsAcceptor::from(Arc::new(config))
        });
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let activity = handlers.activity.clone();
            let scram = handlers.auth.clone();
            let scram = &scram.scram;
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = activity.silent(peer, idle_timeout) => {
                    tracing::info!(%peer, "postgres connection idle too long; closed");
                }
                r = pgwire::tokio::process_socket(socket, acceptor, handlers) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "postgres connection ended with an error");
                    }
                }
            }
            activity.forget(peer);
            // an exchange the client abandoned must not stay behind (nor meet a later client
            // that reuses the address)
            if let Ok(mut waiting) = scram.lock() {
                waiting.remove(&peer);
            }
        });
    }
}

/// When each connection last started a query or signed in, so silent ones can be closed.
#[derive(Default)]
pub struct Activity(std::sync::Mutex<std::collections::HashMap<std::net::SocketAddr, std::time::Instant>>);

impl Activity {
    fn touch(&self, peer: std::net::SocketAddr) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(peer, std::time::Instant::now());
        }
    }

    fn idle_for(&self, peer: std::net::SocketAddr) -> std::time::Duration {
        self.0
            .lock()
            .ok()
            .and_then(|m| m.get(&peer).map(|t| t.elapsed()))
            .unwrap_or_default()
    }

    fn forget(&self, peer: std::net::SocketAddr) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(&peer);
        }
    }

    /// Ends once `peer` has started nothing for `timeout`.
    async fn silent(&self, peer: std::net::SocketAddr, timeout: std::time::Duration) {
        self.touch(peer);
        loop {
            let idle = self.idle_for(peer);
            if idle >= timeout {
                return;
            }
            tokio::time::sleep(timeout - idle).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_commands_are_answered_without_data() -> PgWireResult<()> {
        let parser = PostgresCompatibilityParser::new();
        let parse = |q: &str| parser.parse(q).map_err(|e| user_error("42601", e.to_string()));
        for (q, tag) in [
            ("SET extra_float_digits = 3", "SET"),
            ("BEGIN", "BEGIN"),
            ("COMMIT", "COMMIT"),
        ] {
            let statements = parse(q)?;
            let command = statements.first().and_then(command_of);
            let response = command.map(|c| command_response(&c)).transpose()?;
            match response {
                Some(Response::Execution(t))
                | Some(Response::TransactionStart(t))
                | Some(Response::TransactionEnd(t)) => {
                    assert!(format!("{t:?}").contains(tag), "{q}: {t:?}")
                }
                _ => panic!("{q} is a session command"),
            }
        }
        let statements = parse("SHOW TRANSACTION ISOLATION LEVEL")?;
        assert!(matches!(
            statements.first().and_then(command_of),
            Some(Command::Show(_))
        ));
        assert_eq!(show("server_version")?.1, "16.6");
        assert!(show("shared_buffers").is_err());
        assert!(parse("SELECT 1")?.first().and_then(command_of).is_none());
        Ok(())
    }
}
