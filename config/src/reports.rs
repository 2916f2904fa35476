//! `[reports]`: scheduled e-mail reports and the SMTP server they go through.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{ConfigError, Result};

/// Most scheduled reports.
pub const MAX_EMAIL_REPORTS: usize = 32;
/// Most recipients of one report.
pub const MAX_RECIPIENTS: usize = 50;
/// The reports an e-mail can hold.
pub const EMAIL_VIEWS: [&str; 9] = [
    "traffic",
    "sources",
    "pages",
    "geo",
    "devices",
    "categories",
    "campaigns",
    "goals",
    "funnels",
];

/// Scheduled reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ReportsConfig {
    /// The SMTP server reports are sent through.
    pub smtp: SmtpConfig,
    /// The reports, each with its recipients and schedule.
    pub email: Vec<EmailReport>,
    /// Whether this process sends them on schedule (`marsad up` and `marsad query` do): with
    /// several query processes, set it false on all but one.
    pub send_scheduled: bool,
}

/// How e-mail leaves: an SMTP submission server, always over TLS (STARTTLS) unless the server is
/// on this machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    /// The server's host name (checked against its certificate).
    pub host: String,
    /// Its submission port.
    pub port: u16,
    /// The sender, e.g. `Marsad <reports@kulshi.example>`.
    pub from: String,
    /// The user to log in as; its password is `MARSAD_SECRET_SMTP_PASSWORD` (never in a file).
    pub username: Option<String>,
    /// A PEM file of certificate authorities to trust besides Mozilla's public roots (a company CA).
    pub ca_file: Option<PathBuf>,
    /// Plain SMTP without TLS: refused unless the host is this machine (`localhost`, 127.0.0.1, ::1).
    pub insecure_plaintext: bool,
}

impl Default for ReportsConfig {
    fn default() -> Self {
        ReportsConfig {
            smtp: SmtpConfig::default(),
            email: Vec::new(),
            send_scheduled: true,
        }
    }
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            host: String::new(),
            port: 587,
            from: String::new(),
            username: None,
            ca_file: None,
            insecure_plaintext: false,
        }
    }
}

/// How often a report goes out, and which days it covers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Every day: the day before.
    Daily,
    /// Every Monday: the seven days before (Monday to Sunday).
    Weekly,
    /// On the first of each month: the month before.
    Monthly,
}

/// The language a report is written in.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReportLanguage {
    /// Arabic, right to left.
    Ar,
    /// English.
    En,
}

/// One scheduled e-mail report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EmailReport {
    /// Its name (letters, digits, `-` and `_`): what `marsad report send --id` takes.
    pub id: String,
    /// Who gets it.
    pub recipients: Vec<String>,
    /// How often.
    pub schedule: Schedule,
    /// Arabic or English.
    #[serde(default = "default_language")]
    pub language: ReportLanguage,
    /// Which reports it holds, in order (of [`EMAIL_VIEWS`]).
    #[serde(default = "default_views")]
    pub views: Vec<String>,
    /// The hour (UTC) it is sent at, on its day.
    #[serde(default = "default_hour")]
    pub hour_utc: u32,
}

fn default_language() -> ReportLanguage {
    ReportLanguage::En
}

fn default_views() -> Vec<String> {
    ["traffic", "sources", "pages", "geo"].map(String::from).to_vec()
}

fn default_hour() -> u32 {
    6
}

fn invalid(key: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { key, reason }
}

/// Whether `host` names this machine.
pub fn is_local_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether `address` looks like one e-mail address (`local@domain`, no spaces or brackets).
fn is_address(address: &str) -> bool {
    let address = address
        .rsplit_once('<')
        .map_or(address, |(_, a)| a.trim_end_matches('>'));
    match address.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && (domain.contains('.') || is_local_host(domain))
                && !address.contains(char::is_whitespace)
                && !address.contains(['<', '>', ',', ';'])
        }
        None => false,
    }
}

impl ReportsConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.email.is_empty() {
            return Ok(());
        }
        if self.email.len() > MAX_EMAIL_REPORTS {
            return Err(invalid(
                "reports.email",
                format!("{} reports: at most {MAX_EMAIL_REPORTS}", self.email.len()),
            ));
        }
        let smtp = &self.smtp;
        if smtp.host.trim().is_empty() {
            return Err(invalid(
                "reports.smtp.host",
                "e-mail reports are configured but no SMTP server".into(),
            ));
        }
        if smtp.insecure_plaintext && !is_local_host(&smtp.host) {
            return Err(invalid(
                "reports.smtp.insecure_plaintext",
                format!("`{}` is not this machine: mail to it goes over TLS", smtp.host),
            ));
        }
        if !is_address(&smtp.from) {
            return Err(invalid(
                "reports.smtp.from",
                format!(
                    "`{}`: a sender address such as `Marsad <reports@example.com>`",
                    smtp.from
                ),
            ));
        }
        let mut ids = std::collections::BTreeSet::new();
        for report in &self.email {
            let id_ok = !report.id.is_empty()
                && report.id.len() <= 64
                && report
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !id_ok {
                return Err(invalid(
                    "reports.email.id",
                    format!("`{}`: 1 to 64 letters, digits, `-` or `_`", report.id),
                ));
            }
            if !ids.insert(report.id.as_str()) {
                return Err(invalid("reports.email.id", format!("`{}` twice", report.id)));
            }
            if report.recipients.is_empty() || report.recipients.len() > MAX_RECIPIENTS {
                return Err(invalid(
                    "reports.email.recipients",
                    format!("report `{}`: 1 to {MAX_RECIPIENTS} recipients", report.id),
                ));
            }
            if let Some(bad) = report.recipients.iter().find(|r| !is_address(r)) {
                return Err(invalid(
                    "reports.email.recipients",
                    format!("report `{}`: `{bad}` is not an e-mail address", report.id),
                ));
            }
            if report.views.is_empty() {
                return Err(invalid(
                    "reports.email.views",
                    format!("report `{}` holds no view", report.id),
                ));
            }
            if let Some(bad) = report.views.iter().find(|v| !EMAIL_VIEWS.contains(&v.as_str())) {
                return Err(invalid(
                    "reports.email.views",
                    format!(
                        "report `{}`: no view `{bad}`; there are {}",
                        report.id,
                        EMAIL_VIEWS.join(", ")
                    ),
                ));
            }
            if report.hour_utc > 23 {
                return Err(invalid(
                    "reports.email.hour_utc",
                    format!("report `{}`: {} is not an hour (0 to 23)", report.id, report.hour_utc),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> EmailReport {
        EmailReport {
            id: "weekly".into(),
            recipients: vec!["marketing@kulshi.example".into()],
            schedule: Schedule::Weekly,
            language: ReportLanguage::Ar,
            views: default_views(),
            hour_utc: 6,
        }
    }

    fn config(report: EmailReport) -> ReportsConfig {
        ReportsConfig {
            smtp: SmtpConfig {
                host: "smtp.kulshi.example".into(),
                from: "Marsad <reports@kulshi.example>".into(),
                ..SmtpConfig::default()
            },
            email: vec![report],
            send_scheduled: true,
        }
    }

    #[test]
    fn a_report_is_checked_before_anything_is_sent() {
        assert!(config(report()).validate().is_ok());
        let mut bad = report();
        bad.recipients = vec!["not an address".into()];
        assert!(config(bad).validate().is_err());
        let mut bad = report();
        bad.views = vec!["everything".into()];
        assert!(config(bad).validate().is_err());
        let mut bad = report();
        bad.id = "a b".into();
        assert!(config(bad).validate().is_err());
        let mut bad = report();
        bad.hour_utc = 24;
        assert!(config(bad).validate().is_err());
        let mut no_server = config(report());
        no_server.smtp.host = String::new();
        assert!(no_server.validate().is_err());
        let mut plain = config(report());
        plain.smtp.insecure_plaintext = true;
        assert!(plain.validate().is_err(), "plaintext only to this machine");
        plain.smtp.host = "127.0.0.1".into();
        assert!(plain.validate().is_ok());
    }
}
