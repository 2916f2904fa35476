//! What each purpose is allowed, from the event's consent, the browser's
//! privacy signals and the configured defaults.

use serde::{Deserialize, Serialize};

/// Consent as stated, before defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatedConsent {
    /// Counting at all.
    pub analytics: Option<bool>,
    /// Personalised ads and content.
    pub personalisation: Option<bool>,
    /// Marketing exports.
    pub marketing: Option<bool>,
}

/// Defaults for what an event does not state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsentDefaults {
    /// Analytics when unstated (default yes).
    pub analytics: bool,
    /// Personalisation when unstated (default no).
    pub personalisation: bool,
}

impl Default for ConsentDefaults {
    fn default() -> Self {
        ConsentDefaults {
            analytics: true,
            personalisation: false,
        }
    }
}

/// What may be done with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Store it at all.
    pub analytics: bool,
    /// Give it an `audience_id` (and so segments).
    pub personalisation: bool,
    /// Include it in marketing exports.
    pub marketing: bool,
}

/// Resolves consent: GPC or DNT rule out personalisation and marketing whatever the event says.
pub fn decide(stated: StatedConsent, dnt: bool, gpc: bool, defaults: ConsentDefaults) -> Decision {
    let signal = dnt || gpc;
    let analytics = stated.analytics.unwrap_or(defaults.analytics);
    let personalisation = analytics && !signal && stated.personalisation.unwrap_or(defaults.personalisation);
    let marketing = analytics && !signal && stated.marketing.unwrap_or(false);
    Decision {
        analytics,
        personalisation,
        marketing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privacy_signals_win() {
        let all = StatedConsent {
            analytics: Some(true),
            personalisation: Some(true),
            marketing: Some(true),
        };
        let d = decide(all, false, true, ConsentDefaults::default());
        assert!(d.analytics && !d.personalisation && !d.marketing);
        let d = decide(all, true, false, ConsentDefaults::default());
        assert!(!d.personalisation);
        let d = decide(all, false, false, ConsentDefaults::default());
        assert!(d.analytics && d.personalisation && d.marketing);
    }

    #[test]
    fn defaults_fill_the_gaps() {
        let d = decide(StatedConsent::default(), false, false, ConsentDefaults::default());
        assert!(d.analytics && !d.personalisation && !d.marketing);
        let refused = StatedConsent {
            analytics: Some(false),
            personalisation: Some(true),
            ..Default::default()
        };
        let d = decide(refused, false, false, ConsentDefaults::default());
        assert!(!d.analytics && !d.personalisation);
    }
}
