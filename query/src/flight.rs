//! Arrow Flight SQL on the query service, for data engineers who pull results as Arrow into
//! pyarrow, Polars or pandas with no row-by-row conversion (the ADBC Flight SQL driver, JDBC).
//! The same keys and roles as `/v1/sql` and Postgres: a key as `Authorization: Bearer …`, or
//! as the password of a handshake (user = key name) that answers with that bearer header.
//! Engineers' results stream batch by batch, however long (no row cap: this is the bulk path);
//! analysts' answers are released exactly as `/v1/sql` releases them. Read-only: updates,
//! ingestion and transactions are refused.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::{Schema, SchemaRef};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::FlightServiceServer;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTables, CommandStatementQuery,
    ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, Ticket};
use futures::{Stream, StreamExt, TryStreamExt};
use marsad_config::Role;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::QueryState;
use crate::catalog::TableScope;
use crate::error::ApiError;
use crate::sql::{self, Access};

/// Who a request comes from, once its key is checked.
enum Caller {
    /// Every table, raw rows, streamed.
    Engineer,
    /// The rollups, released answers; spends from the key's budget.
    Analyst(String),
}

/// The Flight SQL service over a query service's state.
pub struct MarsadFlightSql {
    state: QueryState,
    info: SqlInfoData,
}

fn status(e: ApiError) -> Status {
    match &e {
        ApiError::BadRequest(m) if m.contains("read-only") => Status::failed_precondition(e.to_string()),
        ApiError::BadRequest(m) if m.contains("analyst SQL") => Status::permission_denied(e.to_string()),
        ApiError::BadRequest(_) => Status::invalid_argument(e.to_string()),
        ApiError::Timeout(_) => Status::deadline_exceeded(e.to_string()),
        ApiError::Access(_) => Status::permission_denied(e.to_string()),
        ApiError::Busy | ApiError::Unavailable(_) => Status::unavailable(e.to_string()),
        ApiError::BudgetExhausted { .. } => Status::resource_exhausted(e.to_string()),
        _ => {
            tracing::error!(error = %e, "flight sql");
            Status::internal("internal error; see the service log")
        }
    }
}

impl MarsadFlightSql {
    /// The service answering from `state`.
    pub fn new(state: QueryState) -> Result<Self, Status> {
        let mut info = SqlInfoDataBuilder::new();
        info.append(SqlInfo::FlightSqlServerName, "Marsad");
        info.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        info.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
        info.append(SqlInfo::FlightSqlServerReadOnly, true);
        info.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        let info = info.build().map_err(|e| Status::internal(e.to_string()))?;
        Ok(MarsadFlightSql { state, info })
    }

    fn caller_of_key(&self, key: &str) -> Result<(Caller, String), Status> {
        let Some(holder) = self.state.keys.holder_of(key.trim()) else {
            self.state.metrics.count("flight_auth_refused");
            return Err(Status::unauthenticated("unknown API key"));
        };
        if holder.roles.contains(&Role::Engineer) {
            Ok((Caller::Engineer, holder.name.clone()))
        } else if holder.roles.contains(&Role::Analyst) {
            Ok((Caller::Analyst(holder.name.clone()), holder.name.clone()))
        } else {
            Err(Status::permission_denied(format!(
                "key `{}` has neither the engineer nor the analyst role",
                holder.name
            )))
        }
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::unauthenticated("send the API key as `authorization: Bearer <key>`"))?;
        let key = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| Status::unauthenticated("send the API key as `authorization: Bearer <key>`"))?;
        self.caller_of_key(key).map(|(c, _)| c)
    }

    async fn session(&self, caller: &Caller) -> Result<datafusion::prelude::SessionContext, Status> {
        let scope = match caller {
            Caller::Engineer => TableScope::All,
            Caller::Analyst(_) => TableScope::Rollups,
        };
        self.state.catalog.session_with(scope).await.map_err(|e| {
            tracing::error!(error = %e, "could not open the tables");
            Status::internal("could not open the tables; see the service log")
        })
    }

    /// The schema `sql`'s answer will have for `caller`.
    async fn schema(&self, caller: &Caller, sql: &str) -> Result<SchemaRef, Status> {
        let ctx = self.session(caller).await?;
        let df = sql::plan(&ctx, sql, sql::read_only()).await.map_err(status)?;
        let schema: SchemaRef = df.schema().inner().clone();
        Ok(match caller {
            Caller::Engineer => schema,
            Caller::Analyst(_) => sql::released_schema(&schema),
        })
    }

    /// The answer to a metadata command (`ticket` the command itself, `schema` its result's),
    /// for a caller with a key.
    fn metadata_info(
        &self,
        ticket: Vec<u8>,
        schema: &Schema,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(&request)?;
        Ok(Response::new(Self::flight_info(
            schema,
            Ticket::new(ticket),
            request.into_inner(),
        )?))
    }

    fn flight_info(schema: &Schema, ticket: Ticket, descriptor: FlightDescriptor) -> Result<FlightInfo, Status> {
        Ok(FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| Status::internal(format!("encoding the schema: {e}")))?
            .with_endpoint(FlightEndpoint::new().with_ticket(ticket))
            .with_descriptor(descriptor))
    }
}

type DoGetStream = Pin<Box<dyn Stream<Item = Result<arrow_flight::FlightData, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl FlightSqlService for MarsadFlightSql {
    type FlightService = MarsadFlightSql;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>, Status> {
        use base64::Engine;
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let key = if let Some(basic) = header.strip_prefix("Basic ") {
            // (Go's Flight client, under the ADBC driver, leaves the padding out)
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(basic.trim())
                .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(basic.trim()))
                .map_err(|_| Status::unauthenticated("the Basic credentials are not base64"))?;
            let text =
                String::from_utf8(decoded).map_err(|_| Status::unauthenticated("the credentials are not UTF-8"))?;
            let (user, key) = text
                .split_once(':')
                .ok_or_else(|| Status::unauthenticated("the credentials are not user:key"))?;
            let (_, name) = self.caller_of_key(key)?;
            if name != user {
                self.state.metrics.count("flight_auth_refused");
                return Err(Status::unauthenticated("unknown API key"));
            }
            key.trim().to_owned()
        } else if let Some(key) = header.strip_prefix("Bearer ") {
            self.caller_of_key(key)?;
            key.trim().to_owned()
        } else {
            return Err(Status::unauthenticated(
                "sign in with user = the key's name and password = the key, or send `authorization: Bearer <key>`",
            ));
        };
        let output = futures::stream::iter(vec![Ok(HandshakeResponse {
            protocol_version: 0,
            payload: Default::default(),
        })]);
        let mut response: Response<Pin<Box<dyn Stream<Item = _> + Send>>> = Response::new(Box::pin(output));
        let bearer = format!("Bearer {key}")
            .parse()
            .map_err(|_| Status::unauthenticated("the key is not a valid header value"))?;
        response.metadata_mut().insert("authorization", bearer);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let caller = self.caller(&request)?;
        let schema = self.schema(&caller, &query.query).await?;
        // the ticket is the statement itself: `do_get` checks the key and plans it again
        let ticket = TicketStatementQuery {
            statement_handle: query.query.clone().into_bytes().into(),
        };
        let ticket = Ticket::new(ticket.as_any().encode_to_vec());
        Ok(Response::new(Self::flight_info(&schema, ticket, request.into_inner())?))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let caller = self.caller(&request)?;
        let sql = String::from_utf8(ticket.statement_handle.to_vec())
            .map_err(|_| Status::invalid_argument("the ticket is not a statement"))?;
        let ctx = self.session(&caller).await?;
        let slot = self.state.query_slot().await.map_err(status)?;
        let (schema, batches): (SchemaRef, futures::stream::BoxStream<'static, Result<_, _>>) = match &caller {
            Caller::Engineer => {
                let df = sql::plan(&ctx, &sql, sql::read_only()).await.map_err(status)?;
                let schema: SchemaRef = df.schema().inner().clone();
                let stream = df.execute_stream().await.map_err(|e| status(sql::user_error(e)))?;
                (schema, timed_stream(stream, slot, self.state.timeout))
            }
            Caller::Analyst(key) => {
                drop(slot); // run_sql takes its own
                let access = Access::Released {
                    key: key.clone(),
                    mechanism: self.state.release.for_analysts(),
                };
                let result = self.state.run_sql(&ctx, &sql, None, &access).await.map_err(status)?;
                let schema = result.schema.clone();
                (
                    schema,
                    futures::stream::iter(result.batches.into_iter().map(Ok)).boxed(),
                )
            }
        };
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches)
            .map_err(Status::from);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket = query.as_any().encode_to_vec();
        self.metadata_info(ticket, &query.into_builder(&self.info).schema(), request)
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.caller(&request)?;
        let builder = query.into_builder(&self.info);
        let schema = builder.schema();
        let batch = builder.build();
        Ok(Response::new(encoded(schema, batch)))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket = query.as_any().encode_to_vec();
        self.metadata_info(ticket, &query.into_builder().schema(), request)
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let caller = self.caller(&request)?;
        let ctx = self.session(&caller).await?;
        let include_schema = query.include_schema;
        let mut builder = query.into_builder();
        for (catalog, schema_name, schema) in catalog_schemas(&ctx) {
            let mut tables = schema.table_names();
            tables.sort();
            for table in tables {
                let table_schema = match schema.table(&table).await {
                    Ok(Some(t)) if include_schema => t.schema(),
                    _ => Arc::new(Schema::empty()),
                };
                builder
                    .append(&catalog, &schema_name, &table, "TABLE", &table_schema)
                    .map_err(|e| Status::internal(e.to_string()))?;
            }
        }
        let schema = builder.schema();
        let batch = builder.build();
        Ok(Response::new(encoded(schema, batch)))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket = query.as_any().encode_to_vec();
        self.metadata_info(ticket, &query.into_builder().schema(), request)
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let caller = self.caller(&request)?;
        let ctx = self.session(&caller).await?;
        let mut builder = query.into_builder();
        let mut catalogs = ctx.catalog_names();
        catalogs.sort();
        for c in catalogs {
            builder.append(c);
        }
        let schema = builder.schema();
        let batch = builder.build();
        Ok(Response::new(encoded(schema, batch)))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket = query.as_any().encode_to_vec();
        self.metadata_info(ticket, &query.into_builder().schema(), request)
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let caller = self.caller(&request)?;
        let ctx = self.session(&caller).await?;
        let mut builder = query.into_builder();
        for (catalog, schema_name, _) in catalog_schemas(&ctx) {
            builder.append(catalog, schema_name);
        }
        let schema = builder.schema();
        let batch = builder.build();
        Ok(Response::new(encoded(schema, batch)))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// `batches` run by a task of their own, which holds `slot` (a share of the service's query
/// slots) until the stream ends, the client goes away, or `limit` passes, whichever is first:
/// a client that stops reading cannot keep the slot, and a stream cut by the limit ends with
/// an error, never looking complete.
fn timed_stream(
    mut batches: datafusion::physical_plan::SendableRecordBatchStream,
    slot: tokio::sync::OwnedSemaphorePermit,
    limit: Duration,
) -> futures::stream::BoxStream<'static, Result<arrow::record_batch::RecordBatch, arrow_flight::error::FlightError>> {
    use arrow_flight::error::FlightError;
    use std::sync::atomic::{AtomicBool, Ordering};
    let deadline = tokio::time::Instant::now() + limit;
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let complete = Arc::new(AtomicBool::new(false));
    let done = complete.clone();
    tokio::spawn(async move {
        let _slot = slot;
        loop {
            let item = match tokio::time::timeout_at(deadline, batches.next()).await {
                Err(_) => return,
                Ok(None) => {
                    done.store(true, Ordering::Release);
                    return;
                }
                Ok(Some(batch)) => batch.map_err(|e| FlightError::ExternalError(Box::new(e))),
            };
            let failed = item.is_err();
            match tokio::time::timeout_at(deadline, tx.send(item)).await {
                // an error was handed over: the stream ends with it
                Ok(Ok(())) if failed => {
                    done.store(true, Ordering::Release);
                    return;
                }
                Ok(Ok(())) => {}
                // the client went away, or stopped reading past the limit
                _ => return,
            }
        }
    });
    let cut = futures::stream::once(async move {
        (!complete.load(Ordering::Acquire)).then(|| {
            Err(FlightError::Tonic(Box::new(Status::deadline_exceeded(format!(
                "the query ran past query.timeout_secs ({} s) and was cut",
                limit.as_secs()
            )))))
        })
    })
    .filter_map(futures::future::ready);
    tokio_stream::wrappers::ReceiverStream::new(rx).chain(cut).boxed()
}

/// Every schema of every catalog of `ctx` but `information_schema`, sorted by name.
fn catalog_schemas(
    ctx: &datafusion::prelude::SessionContext,
) -> Vec<(String, String, Arc<dyn datafusion::catalog::SchemaProvider>)> {
    let mut out = Vec::new();
    for c in ctx.catalog_names() {
        let Some(catalog) = ctx.catalog(&c) else { continue };
        for s in catalog.schema_names() {
            if s == "information_schema" {
                continue;
            }
            if let Some(schema) = catalog.schema(&s) {
                out.push((c.clone(), s, schema));
            }
        }
    }
    out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    out
}

/// One metadata batch as a Flight data stream.
fn encoded(
    schema: SchemaRef,
    batch: Result<arrow::record_batch::RecordBatch, arrow_flight::error::FlightError>,
) -> DoGetStream {
    Box::pin(
        FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(futures::stream::once(async move { batch }))
            .map_err(Status::from),
    )
}

/// Serves Flight SQL on `listener` until `shutdown`, over TLS when `tls` holds a certificate and
/// key (PEM), as gRPC over HTTP/2.
pub async fn serve_flight(
    listener: tokio::net::TcpListener,
    state: QueryState,
    tls: Option<(Vec<u8>, Vec<u8>)>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let service = match MarsadFlightSql::new(state) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "flight sql could not start");
            return Ok(());
        }
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, tls = tls.is_some(), "flight sql listening");
    }
    let mut server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .timeout(Duration::from_secs(24 * 3600));
    if let Some((cert, key)) = tls {
        // tonic's rustls takes the process's provider; Marsad's other listeners name ring
        // explicitly, and the graph enables both ring and aws-lc, so none is implied
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let identity = tonic::transport::Identity::from_pem(cert, key);
        server = server.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    server
        .add_service(FlightServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::physical_plan::stream::RecordBatchStreamAdapter;

    #[tokio::test]
    async fn a_stream_past_its_limit_ends_in_an_error_and_gives_its_slot_back() {
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let slot = slots.clone().acquire_owned().await.expect("a slot");
        // a query that never yields a batch
        let never = RecordBatchStreamAdapter::new(Arc::new(Schema::empty()), futures::stream::pending());
        let mut out = timed_stream(Box::pin(never), slot, Duration::from_millis(50));
        let first = out.next().await;
        assert!(
            matches!(&first, Some(Err(arrow_flight::error::FlightError::Tonic(s))) if s.code() == tonic::Code::DeadlineExceeded),
            "{first:?}"
        );
        assert!(out.next().await.is_none());
        assert_eq!(slots.available_permits(), 1, "the slot is free again");
    }

    #[tokio::test]
    async fn a_finished_stream_ends_without_an_error() {
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let slot = slots.clone().acquire_owned().await.expect("a slot");
        let empty = RecordBatchStreamAdapter::new(Arc::new(Schema::empty()), futures::stream::empty());
        let out: Vec<_> = timed_stream(Box::pin(empty), slot, Duration::from_secs(30))
            .collect()
            .await;
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(slots.available_permits(), 1);
    }
}
