//! Scheduled e-mail reports (`[[reports.email]]`): the key figures and the
//! configured views of a day, week or month, as an HTML e-mail with charts
//! drawn here and attached inline, sent over SMTP with STARTTLS.
//!
//! Every number is one the reports release (`crate::reports::run`), always
//! with noise (an e-mail is forwarded beyond whoever it was sent to). Each send
//! asks its questions under a name of its own, so its noise is its own: an
//! e-mail's numbers cannot be subtracted from a dashboard's, or from another
//! send's, to reveal the events that arrived in between. Each send pays from the
//! report's own budget (`email:<id>`), in a ledger kept apart from the query
//! service's. A period is sent once: what was sent is recorded under
//! `<data_dir>/reports/`, and the latest period missed while Marsad was down
//! goes out when it is back.

pub mod chart;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate, Timelike, Utc};
use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::{Credentials, Mechanism as AuthMechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use marsad_config::{Config, EmailReport, ReportLanguage, ReportsConfig, Schedule};
use marsad_privacy::keys::SecretKey;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::catalog::{TableCatalog, TableScope};
use crate::error::ApiError;
use crate::release::{Mechanism, Release};
use crate::reports::{ReportKind, ReportRequest};

/// The SMTP password's environment variable.
pub const PASSWORD_ENV: &str = "MARSAD_SECRET_SMTP_PASSWORD";
/// Rows of each view an e-mail lists.
const ROWS_PER_VIEW: usize = 8;
/// How often the schedule is looked at.
const CHECK_EVERY: Duration = Duration::from_secs(60);
/// How long one message may take to send.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a report that failed waits before it is tried again.
const RETRY_AFTER: chrono::Duration = chrono::Duration::minutes(15);

/// Why a report was not composed or sent.
#[derive(Debug, thiserror::Error)]
pub enum EmailError {
    /// No report of that id is configured.
    #[error("no e-mail report `{0}` in [[reports.email]]")]
    NoSuchReport(String),
    /// A report's numbers could not be released (budget, tables).
    #[error("report `{view}`: {source}")]
    Report {
        /// The view.
        view: String,
        /// Why.
        source: ApiError,
    },
    /// The tables could not be opened.
    #[error("opening the tables: {0}")]
    Tables(#[from] crate::catalog::CatalogError),
    /// A chart could not be drawn.
    #[error("drawing a chart: {0}")]
    Chart(String),
    /// An address in the config does not parse.
    #[error("address `{address}`: {source}")]
    Address {
        /// The address.
        address: String,
        /// Why.
        source: lettre::address::AddressError,
    },
    /// The message could not be built.
    #[error("building the message: {0}")]
    Message(#[from] lettre::error::Error),
    /// The SMTP server refused, or could not be reached or trusted.
    #[error("sending through {server}: {source}")]
    Smtp {
        /// host:port.
        server: String,
        /// Why.
        source: lettre::transport::smtp::Error,
    },
    /// A user to log in as, but no password in the environment.
    #[error("reports.smtp.username is set but {PASSWORD_ENV} is not")]
    NoPassword,
    /// The SMTP server stopped answering.
    #[error("sending through {server}: no answer within {} s", SEND_TIMEOUT.as_secs())]
    NoAnswer {
        /// host:port.
        server: String,
    },
    /// The CA file could not be read or parsed.
    #[error("reports.smtp.ca_file {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The record of sent reports could not be kept.
    #[error("{path}: {source}")]
    Record {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The days a report covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    /// First day.
    pub from: NaiveDate,
    /// Last day.
    pub to: NaiveDate,
}

/// The period a report sent on `day` covers: the day or seven days before it, or the
/// calendar month before its month.
pub fn period_sent_on(schedule: Schedule, day: NaiveDate) -> Period {
    let yesterday = day.pred_opt().unwrap_or(day);
    match schedule {
        Schedule::Daily => Period {
            from: yesterday,
            to: yesterday,
        },
        Schedule::Weekly => Period {
            from: day - chrono::Duration::days(7),
            to: yesterday,
        },
        Schedule::Monthly => {
            // the calendar month before `day`'s
            let first = day.with_day(1).unwrap_or(day);
            let to = first.pred_opt().unwrap_or(first);
            Period {
                from: to.with_day(1).unwrap_or(to),
                to,
            }
        }
    }
}

/// Whether a report of `schedule` goes out on `day`.
fn is_send_day(schedule: Schedule, day: NaiveDate) -> bool {
    match schedule {
        Schedule::Daily => true,
        Schedule::Weekly => day.weekday() == chrono::Weekday::Mon,
        Schedule::Monthly => day.day() == 1,
    }
}

/// The latest period of `report` whose sending time has come at `now`.
pub fn latest_due(report: &EmailReport, now: DateTime<Utc>) -> Period {
    let mut day = now.date_naive();
    if now.hour() < report.hour_utc {
        day = day.pred_opt().unwrap_or(day);
    }
    // at most a month back to the latest send day
    for _ in 0..32 {
        if is_send_day(report.schedule, day) {
            break;
        }
        day = day.pred_opt().unwrap_or(day);
    }
    period_sent_on(report.schedule, day)
}

/// One e-mail sent.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The report.
    pub id: String,
    /// Its period.
    pub period: Period,
    /// How many recipients it went to.
    pub recipients: usize,
}

/// The measures an e-mail shows of each view (as the dashboard does).
fn measures_of(view: &str) -> &'static [&'static str] {
    match view {
        "traffic" => &["visitors", "page_views", "sessions"],
        "sources" => &["sessions", "visitors", "bounce_rate"],
        "pages" => &["page_views", "entries", "exits"],
        "geo" | "devices" => &["visitors", "page_views"],
        "categories" => &["page_views", "visitors"],
        "campaigns" => &["impressions", "clicks", "ctr"],
        "goals" => &["conversions", "visitors", "conversion_rate"],
        "funnels" => &["sessions", "from_previous", "drop_off"],
        _ => &["visitors"],
    }
}

const RATES: [&str; 6] = [
    "ctr",
    "bounce_rate",
    "exit_rate",
    "conversion_rate",
    "from_previous",
    "drop_off",
];

/// The words of a report in its language.
fn word(language: ReportLanguage, key: &str) -> String {
    let (en, ar) = match key {
        "daily" => ("Daily report", "التقرير اليومي"),
        "weekly" => ("Weekly report", "التقرير الأسبوعي"),
        "monthly" => ("Monthly report", "التقرير الشهري"),
        "traffic" => ("Traffic by day", "الزيارات يوماً بيوم"),
        "sources" => ("Where visitors come from", "من أين يأتي الزوار"),
        "pages" => ("Top pages", "أهم الصفحات"),
        "geo" => ("Countries", "الدول"),
        "devices" => ("Devices", "الأجهزة"),
        "categories" => ("Top categories", "أهم الفئات"),
        "campaigns" => ("Campaigns", "الحملات"),
        "goals" => ("Goals", "الأهداف"),
        "funnels" => ("Funnels", "مسارات التحويل"),
        "visitors" => ("Visitors", "الزوار"),
        "page_views" => ("Page views", "مشاهدات الصفحات"),
        "sessions" => ("Sessions", "الجلسات"),
        "bounce_rate" => ("Bounce rate", "معدل الارتداد"),
        "entries" => ("Entries", "مرات الدخول"),
        "exits" => ("Exits", "مرات الخروج"),
        "impressions" => ("Impressions", "مرات الظهور"),
        "clicks" => ("Clicks", "النقرات"),
        "ctr" => ("Click-through rate", "نسبة النقر"),
        "conversions" => ("Conversions", "التحويلات"),
        "conversion_rate" => ("Conversion rate", "معدل التحويل"),
        "from_previous" => ("From the step before", "من الخطوة السابقة"),
        "drop_off" => ("Drop-off", "نسبة التسرّب"),
        "key_figures" => ("Key figures", "أهم الأرقام"),
        "organic_search" => ("Organic search", "بحث مجاني"),
        "paid_search" => ("Paid search", "بحث مدفوع"),
        "social" => ("Social", "شبكات التواصل"),
        "paid_social" => ("Paid social", "تواصل مدفوع"),
        "email" => ("E-mail", "البريد الإلكتروني"),
        "display" => ("Display", "إعلانات مصوّرة"),
        "referral" => ("Referral", "إحالة"),
        "direct" => ("Direct", "مباشر"),
        "compared" => ("compared with the period before", "مقارنة بالفترة السابقة"),
        "held_back" => (
            "Too few visitors to show without singling anyone out.",
            "عدد الزوار أقل من أن يُعرض دون كشف أحد.",
        ),
        "note" => (
            "Numbers are estimates (≈): each carries a little random noise so that no visitor can be singled out, and rows with too few visitors are not shown.",
            "الأرقام تقديرية (≈): في كل منها قدر يسير من التشويش العشوائي كي لا يُستدل على زائر بعينه، ولا تُعرض الصفوف التي فيها عدد قليل من الزوار.",
        ),
        "sent_by" => ("Sent by Marsad: report", "أرسله مرصد: التقرير"),
        other => (other, other),
    };
    match language {
        ReportLanguage::En => en.to_owned(),
        ReportLanguage::Ar => ar.to_owned(),
    }
}

/// Text made safe inside HTML (values come from the public ingest: paths, referrers, ids).
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A released number as shown: ≈ and thousands separated, or a percentage for a rate.
fn shown(measure: &str, value: &Value) -> String {
    if RATES.contains(&measure) {
        return value.as_f64().map_or("—".into(), |r| format!("{:.1}%", r * 100.0));
    }
    let Some(n) = value.as_i64() else {
        return "—".into();
    };
    let digits = n.unsigned_abs().to_string();
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("≈ {}{grouped}", if n < 0 { "-" } else { "" })
}

/// The arrow and relative change of a measure against the period before, if both were shown.
fn change(change: &Value) -> String {
    let arrow = match change["direction"].as_str() {
        Some("up") => "▲",
        Some("down") => "▼",
        Some("flat") => "=",
        _ => return String::new(),
    };
    match change["relative"].as_f64() {
        Some(r) => format!("{arrow} {:+.0}%", r * 100.0),
        None => arrow.to_owned(),
    }
}

/// A row's label: its dimension values, joined (channels named in the report's language).
fn label(view: &str, report: &Value, row: &Value, lang: ReportLanguage) -> String {
    let dims: Vec<String> = report["dimensions"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(Value::as_str)
                .map(|d| match &row[d] {
                    Value::String(s) if view == "traffic" => s.chars().take(10).collect(),
                    Value::String(s) if d == "channel" => word(lang, s),
                    Value::String(s) => s.clone(),
                    Value::Null => "—".into(),
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    dims.join(" · ")
}

/// The HTML, text and charts of one e-mail.
struct Composed {
    subject: String,
    html: String,
    text: String,
    /// (content id, PNG)
    charts: Vec<(String, Vec<u8>)>,
}

/// Sends the configured reports on schedule, or at once.
pub struct EmailReports {
    config: ReportsConfig,
    /// What each send's release mechanism is made from.
    release_config: Config,
    noise_key: Arc<SecretKey>,
    catalog: Arc<TableCatalog>,
    record: PathBuf,
    password: Option<String>,
}

/// What one look at the schedule did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The reports sent.
    pub sent: Vec<Sent>,
    /// The reports due that could not be sent, and why (tried again later).
    pub failed: Vec<(String, EmailError)>,
}

impl EmailReports {
    /// The reports of `config`, released with `noise_key` from the tables `catalog` reads;
    /// `None` when none is configured.
    pub fn new(config: &Config, noise_key: Arc<SecretKey>, catalog: Arc<TableCatalog>) -> Option<Self> {
        if config.reports.email.is_empty() {
            return None;
        }
        Some(EmailReports {
            config: config.reports.clone(),
            release_config: config.clone(),
            noise_key,
            catalog,
            record: config.data_dir.join("reports").join("sent.json"),
            password: std::env::var(PASSWORD_ENV).ok().filter(|p| !p.is_empty()),
        })
    }

    /// The configured reports.
    pub fn reports(&self) -> &[EmailReport] {
        &self.config.email
    }

    fn report(&self, id: &str) -> Result<&EmailReport, EmailError> {
        self.config
            .email
            .iter()
            .find(|r| r.id == id)
            .ok_or_else(|| EmailError::NoSuchReport(id.to_owned()))
    }

    /// `marsad report send --now`: sends `id` (or every report) for the period it would cover
    /// if it were sent today, without touching the schedule.
    pub async fn send_now(&self, id: Option<&str>, now: DateTime<Utc>) -> Result<Vec<Sent>, EmailError> {
        let reports: Vec<&EmailReport> = match id {
            Some(id) => vec![self.report(id)?],
            None => self.config.email.iter().collect(),
        };
        let mut sent = Vec::new();
        for report in reports {
            let period = period_sent_on(report.schedule, now.date_naive());
            sent.push(self.send(report, period, now).await?);
        }
        Ok(sent)
    }

    /// Sends every report (or `only` that one) whose latest period is due at `now` and not
    /// sent yet, and records each; one that fails waits [`RETRY_AFTER`] in `not_before`.
    pub async fn send_due(
        &self,
        now: DateTime<Utc>,
        only: Option<&str>,
        not_before: &mut HashMap<String, DateTime<Utc>>,
    ) -> Result<Outcome, EmailError> {
        if let Some(id) = only {
            self.report(id)?;
        }
        let mut outcome = Outcome::default();
        for report in self.config.email.iter().filter(|r| only.is_none_or(|id| r.id == id)) {
            let period = latest_due(report, now);
            if self
                .read_record()
                .get(&report.id)
                .is_some_and(|last| *last >= period.to)
            {
                continue;
            }
            if not_before.get(&report.id).is_some_and(|t| *t > now) {
                continue;
            }
            let sent = match self.send(report, period, now).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(report = %report.id, error = %e, retry_in_minutes = RETRY_AFTER.num_minutes(), "e-mail report not sent");
                    not_before.insert(report.id.clone(), now + RETRY_AFTER);
                    outcome.failed.push((report.id.clone(), e));
                    continue;
                }
            };
            tracing::info!(report = %sent.id, from = %period.from, to = %period.to, recipients = sent.recipients, "e-mail report sent");
            // read again: another process may have recorded another report meanwhile
            let mut record = self.read_record();
            record.insert(report.id.clone(), period.to);
            if let Err(e) = self.write_record(&record) {
                tracing::error!(report = %report.id, error = %e, "sent, but not recorded: it may be sent again");
                not_before.insert(report.id.clone(), now + RETRY_AFTER);
                outcome.failed.push((report.id.clone(), e));
            }
            outcome.sent.push(sent);
        }
        Ok(outcome)
    }

    /// Looks at the schedule every minute until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut not_before = HashMap::new();
        loop {
            if let Err(e) = self.send_due(Utc::now(), None, &mut not_before).await {
                tracing::warn!(error = %e, "e-mail reports");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
        }
    }

    fn read_record(&self) -> BTreeMap<String, NaiveDate> {
        std::fs::read(&self.record)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn write_record(&self, record: &BTreeMap<String, NaiveDate>) -> Result<(), EmailError> {
        let path = self.record.clone();
        let err = |source| EmailError::Record {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| err(std::io::Error::other(e)))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)
    }

    /// Composes `report` for `period` and sends it to each recipient.
    async fn send(&self, report: &EmailReport, period: Period, now: DateTime<Utc>) -> Result<Sent, EmailError> {
        let composed = self.compose(report, period, now).await?;
        let transport = self.transport()?;
        let from: Mailbox = self.config.smtp.from.parse().map_err(|source| EmailError::Address {
            address: self.config.smtp.from.clone(),
            source,
        })?;
        for recipient in &report.recipients {
            let to: Mailbox = recipient.parse().map_err(|source| EmailError::Address {
                address: recipient.clone(),
                source,
            })?;
            // one message per recipient: no one sees who else gets it
            let message = message(&composed, from.clone(), to)?;
            let server = format!("{}:{}", self.config.smtp.host, self.config.smtp.port);
            // lettre's own timeout does not cover every wait of the async transport
            match tokio::time::timeout(SEND_TIMEOUT, transport.send(message)).await {
                Ok(Ok(_)) => {}
                Ok(Err(source)) => return Err(EmailError::Smtp { server, source }),
                Err(_) => return Err(EmailError::NoAnswer { server }),
            }
        }
        Ok(Sent {
            id: report.id.clone(),
            period,
            recipients: report.recipients.len(),
        })
    }

    fn transport(&self) -> Result<AsyncSmtpTransport<Tokio1Executor>, EmailError> {
        let smtp = &self.config.smtp;
        let server = format!("{}:{}", smtp.host, smtp.port);
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host)
            .port(smtp.port)
            .timeout(Some(Duration::from_secs(30)));
        if !smtp.insecure_plaintext {
            let mut tls = TlsParameters::builder(smtp.host.clone());
            if let Some(path) = &smtp.ca_file {
                let pem = std::fs::read(path).map_err(|e| EmailError::CaFile {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                let ca = Certificate::from_pem(&pem).map_err(|e| EmailError::CaFile {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                tls = tls.add_root_certificate(ca);
            }
            let tls = tls
                .build_rustls()
                .map_err(|source| EmailError::Smtp { server, source })?;
            // STARTTLS, required: a server that does not offer it gets nothing
            builder = builder.tls(Tls::Required(tls));
        }
        if smtp.username.is_some() && self.password.is_none() {
            return Err(EmailError::NoPassword);
        }
        if let (Some(user), Some(password)) = (&smtp.username, &self.password) {
            // PLAIN or LOGIN, only ever inside the TLS session (or to this machine)
            builder = builder
                .credentials(Credentials::new(user.clone(), password.clone()))
                .authentication(vec![AuthMechanism::Plain, AuthMechanism::Login]);
        }
        Ok(builder.build())
    }

    /// The released reports of `report`'s views for `period`, as HTML with inline charts.
    async fn compose(&self, report: &EmailReport, period: Period, now: DateTime<Utc>) -> Result<Composed, EmailError> {
        let lang = report.language;
        let rtl = lang == ReportLanguage::Ar;
        let ctx = self.catalog.session_with(TableScope::Rollups).await?;
        let budget = format!("email:{}", report.id);
        // each send asks its own questions: fresh noise, paid again, so no two sends (nor a
        // send and the dashboard) give the same noise over data that changed in between. The
        // ledger is its own (the query service keeps another in the same data dir), read anew.
        let send = format!("{budget}|sent-at={}", now.timestamp_micros());
        let release = Release::new(
            &self.release_config,
            self.noise_key.clone(),
            Some(self.release_config.data_dir.join("release").join("email")),
        )
        .in_namespace(&send);
        let mut views = Vec::new();
        // the key figures come from traffic: always asked, first
        let mut asked: Vec<&str> = vec!["traffic"];
        asked.extend(report.views.iter().map(String::as_str).filter(|v| *v != "traffic"));
        for view in asked {
            let err = |source| EmailError::Report {
                view: view.to_owned(),
                source,
            };
            let kind = ReportKind::parse(view).ok_or_else(|| err(ApiError::NotFoundWhat(view.to_owned())))?;
            let mut params = HashMap::from([
                ("from".to_owned(), period.from.to_string()),
                ("to".to_owned(), period.to.to_string()),
                ("compare".to_owned(), "previous_period".to_owned()),
            ]);
            if view == "traffic" {
                params.insert("granularity".into(), "day".into());
            } else if view != "funnels" {
                params.insert("order".into(), measures_of(view)[0].into());
                params.insert("limit".into(), ROWS_PER_VIEW.to_string());
            }
            let req = ReportRequest::parse(kind, &params, now.date_naive()).map_err(err)?;
            let questions: Vec<(String, usize)> = req
                .identities(now)
                .into_iter()
                .map(|(identity, measures)| (format!("{send}|{identity}"), measures))
                .collect();
            release.charge_all(&budget, &questions, now).map_err(err)?;
            let released = crate::reports::run(&ctx, &req, &release, Mechanism::Noise, now)
                .await
                .map_err(err)?;
            views.push((view, released));
        }
        let title = word(
            lang,
            match report.schedule {
                Schedule::Daily => "daily",
                Schedule::Weekly => "weekly",
                Schedule::Monthly => "monthly",
            },
        );
        let dates = if period.from == period.to {
            period.from.to_string()
        } else {
            format!("{} – {}", period.from, period.to)
        };
        let subject = format!("Marsad · {title}: {dates}");
        let dir = if rtl { "rtl" } else { "ltr" };
        let lang_code = if rtl { "ar" } else { "en" };
        let mut html = format!(
            "<!doctype html><html lang=\"{lang_code}\" dir=\"{dir}\"><head><meta charset=\"utf-8\"><title>{}</title></head>\
             <body dir=\"{dir}\" style=\"font-family:Tahoma,Arial,sans-serif;color:#1d2733;max-width:680px;margin:auto\">\
             <h1 style=\"font-size:20px\">{} <bdi dir=\"ltr\">{}</bdi></h1>",
            escape(&subject),
            escape(&title),
            escape(&dates)
        );
        let mut text = format!("{subject}\n\n");
        let mut charts = Vec::new();
        // key figures: the traffic total, with its change
        if let Some((_, traffic)) = views.first() {
            html.push_str(&format!(
                "<h2 style=\"font-size:16px\">{}</h2><table class=\"key-figures\" style=\"border-collapse:collapse\"><tr>",
                escape(&word(lang, "key_figures"))
            ));
            text.push_str(&format!("{}\n", word(lang, "key_figures")));
            for m in measures_of("traffic") {
                let value = &traffic["total"][m];
                let delta = change(&traffic["change"][m]);
                html.push_str(&format!(
                    "<td style=\"padding:8px 16px 8px 0\" data-measure=\"{m}\"><div style=\"font-size:12px;color:#5b6773\">{}</div>\
                     <div class=\"figure\" style=\"font-size:22px;font-weight:bold\">{}</div><div style=\"font-size:12px\">{} {}</div></td>",
                    escape(&word(lang, m)),
                    escape(&shown(m, value)),
                    escape(&delta),
                    if delta.is_empty() { String::new() } else { escape(&word(lang, "compared")) }
                ));
                text.push_str(&format!("  {}: {} {delta}\n", word(lang, m), shown(m, value)));
            }
            html.push_str("</tr></table>");
        }
        for (view, released) in views
            .iter()
            .filter(|(v, _)| *v != "traffic" || report.views.iter().any(|r| r == "traffic"))
        {
            let measures = measures_of(view);
            let rows = released["rows"].as_array().cloned().unwrap_or_default();
            let rows: Vec<Value> = if *view == "traffic" {
                rows
            } else {
                rows.into_iter().take(ROWS_PER_VIEW).collect()
            };
            html.push_str(&format!(
                "<h2 style=\"font-size:16px;margin-top:24px\">{}</h2>",
                escape(&word(lang, view))
            ));
            text.push_str(&format!("\n{}\n", word(lang, view)));
            if rows.is_empty() {
                html.push_str(&format!(
                    "<p style=\"color:#5b6773\">{}</p>",
                    escape(&word(lang, "held_back"))
                ));
                text.push_str(&format!("  {}\n", word(lang, "held_back")));
                continue;
            }
            let first = measures[0];
            let values: Vec<u64> = rows.iter().map(|r| r[first].as_u64().unwrap_or(0)).collect();
            let compared: Vec<Option<u64>> = rows.iter().map(|r| r["change"][first]["previous"].as_u64()).collect();
            let has_compared = *view == "traffic" && compared.iter().any(Option::is_some);
            let png = chart::bars(&values, has_compared.then_some(compared.as_slice()), rtl)?;
            let cid = format!("chart-{view}@marsad");
            html.push_str(&format!(
                "<img src=\"cid:{cid}\" width=\"{}\" height=\"{}\" alt=\"{}\" style=\"max-width:100%;height:auto\">",
                chart::SIZE.0,
                chart::SIZE.1,
                escape(&word(lang, first))
            ));
            charts.push((cid, png));
            html.push_str(&format!(
                "<table class=\"view\" data-view=\"{view}\" style=\"border-collapse:collapse;width:100%;font-size:13px\"><tr><th></th>"
            ));
            for m in measures {
                html.push_str(&format!(
                    "<th style=\"text-align:end;padding:4px\">{}</th>",
                    escape(&word(lang, m))
                ));
            }
            html.push_str("</tr>");
            for row in &rows {
                let name = label(view, released, row, lang);
                html.push_str(&format!(
                    "<tr><td style=\"padding:4px;border-top:1px solid #e2e6ea\"><bdi>{}</bdi></td>",
                    escape(&name)
                ));
                text.push_str(&format!("  {name}:"));
                for m in measures.iter() {
                    let delta = change(&row["change"][m]);
                    html.push_str(&format!(
                        "<td style=\"text-align:end;padding:4px;border-top:1px solid #e2e6ea\" data-measure=\"{m}\">{} <small>{}</small></td>",
                        escape(&shown(m, &row[m])),
                        escape(&delta)
                    ));
                    text.push_str(&format!(" {} {}", word(lang, m), shown(m, &row[m])));
                }
                html.push_str("</tr>");
                text.push('\n');
            }
            html.push_str("</table>");
        }
        html.push_str(&format!(
            "<p style=\"font-size:12px;color:#5b6773;margin-top:24px\">{}</p>\
             <p style=\"font-size:12px;color:#5b6773\">{} <bdi dir=\"ltr\">{}</bdi></p></body></html>",
            escape(&word(lang, "note")),
            escape(&word(lang, "sent_by")),
            escape(&report.id)
        ));
        text.push_str(&format!("\n{}\n", word(lang, "note")));
        Ok(Composed {
            subject,
            html,
            text,
            charts,
        })
    }
}

/// The MIME message: text and HTML alternatives, the charts related to the HTML, inline.
fn message(composed: &Composed, from: Mailbox, to: Mailbox) -> Result<Message, EmailError> {
    let alternative = MultiPart::alternative()
        .singlepart(SinglePart::plain(composed.text.clone()))
        .singlepart(SinglePart::html(composed.html.clone()));
    let mut related = MultiPart::related().multipart(alternative);
    for (cid, png) in &composed.charts {
        related = related.singlepart(Attachment::new_inline(cid.clone()).body(
            png.clone(),
            ContentType::parse("image/png").unwrap_or(ContentType::TEXT_PLAIN),
        ));
    }
    Ok(Message::builder()
        .from(from)
        .to(to)
        .subject(composed.subject.clone())
        .multipart(related)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(schedule: Schedule, hour_utc: u32) -> EmailReport {
        EmailReport {
            id: "r".into(),
            recipients: vec!["a@kulshi.example".into()],
            schedule,
            language: ReportLanguage::En,
            views: vec!["traffic".into()],
            hour_utc,
        }
    }

    fn at(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
        NaiveDate::from_ymd_opt(y, m, d)
            .and_then(|d| d.and_hms_opt(h, 0, 0))
            .unwrap_or_default()
            .and_utc()
    }

    fn day(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap_or_default()
    }

    #[test]
    fn each_schedule_covers_the_period_before_its_send_day() {
        // Wednesday 2 December 2026
        let weekly = report(Schedule::Weekly, 6);
        assert_eq!(
            latest_due(&weekly, at(2026, 12, 2, 12)),
            Period {
                from: day(2026, 11, 23),
                to: day(2026, 11, 29)
            },
            "the Monday before: Monday to Sunday"
        );
        // Monday 30 November, before and after the hour
        assert_eq!(latest_due(&weekly, at(2026, 11, 30, 5)).to, day(2026, 11, 22));
        assert_eq!(latest_due(&weekly, at(2026, 11, 30, 6)).to, day(2026, 11, 29));
        let monthly = report(Schedule::Monthly, 0);
        assert_eq!(
            latest_due(&monthly, at(2026, 12, 2, 0)),
            Period {
                from: day(2026, 11, 1),
                to: day(2026, 11, 30)
            }
        );
        assert_eq!(latest_due(&monthly, at(2027, 3, 1, 0)).from, day(2027, 2, 1));
        let daily = report(Schedule::Daily, 6);
        assert_eq!(latest_due(&daily, at(2026, 12, 2, 7)).to, day(2026, 12, 1));
        assert_eq!(latest_due(&daily, at(2026, 12, 2, 5)).to, day(2026, 11, 30));
        // a test send today: the seven days to yesterday
        assert_eq!(
            period_sent_on(Schedule::Weekly, day(2026, 12, 2)),
            Period {
                from: day(2026, 11, 25),
                to: day(2026, 12, 1)
            }
        );
    }

    #[test]
    fn numbers_and_names_from_the_data_cannot_write_html() {
        assert_eq!(
            escape("<img src=x onerror=alert(1)>&\"'"),
            "&lt;img src=x onerror=alert(1)&gt;&amp;&quot;&#39;"
        );
        assert_eq!(shown("visitors", &serde_json::json!(1234567)), "≈ 1,234,567");
        assert_eq!(shown("ctr", &serde_json::json!(0.125)), "12.5%");
        assert_eq!(shown("visitors", &Value::Null), "—");
        assert_eq!(
            change(&serde_json::json!({"direction": "up", "relative": 0.5})),
            "▲ +50%"
        );
        assert_eq!(change(&Value::Null), "");
    }
}
