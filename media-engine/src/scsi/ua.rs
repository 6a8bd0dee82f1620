//! Unit attention conditions (SAM-5 5.14, SPC-4 with UA_INTLCK_CTRL = 00b): events one I_T
//! nexus must hear about before its next command runs, such as a reset or another nexus
//! changing reservations or mode parameters.

use std::collections::{HashMap, VecDeque};

use super::Nexus;
use super::sense::Asc;

/// I_T nexuses tracked per logical unit. The transport reports the end of each nexus, so this
/// only bounds a transport that forgets to: nexuses beyond it get no unit attentions.
const MAX_NEXUSES: usize = 4096;
/// Pending conditions per I_T nexus; older ones are dropped first (SAM-5 allows reporting
/// only the most recent when conditions accumulate).
const MAX_PENDING: usize = 8;

/// The I_T nexuses that have used a logical unit and their pending unit attentions.
#[derive(Debug, Default)]
pub(crate) struct UnitAttentions {
    pending: HashMap<Nexus, VecDeque<Asc>>,
}

impl UnitAttentions {
    /// Starts tracking `nexus` if it is new.
    pub fn touch(&mut self, nexus: &Nexus) {
        if !self.pending.contains_key(nexus) && self.pending.len() < MAX_NEXUSES {
            self.pending.insert(nexus.clone(), VecDeque::new());
        }
    }

    /// Queues `asc` for `nexus` if it is tracked.
    pub fn establish(&mut self, nexus: &Nexus, asc: Asc) {
        if let Some(queue) = self.pending.get_mut(nexus) {
            push(queue, asc);
        }
    }

    /// Queues `asc` for every tracked I_T nexus except `except`.
    pub fn establish_all(&mut self, asc: Asc, except: Option<&Nexus>) {
        for (nexus, queue) in &mut self.pending {
            if Some(nexus) != except {
                push(queue, asc);
            }
        }
    }

    /// Takes the oldest pending unit attention of `nexus`.
    pub fn take(&mut self, nexus: &Nexus) -> Option<Asc> {
        self.pending.get_mut(nexus).and_then(VecDeque::pop_front)
    }

    /// Forgets an I_T nexus that no longer exists, with its pending conditions.
    pub fn forget(&mut self, nexus: &Nexus) {
        self.pending.remove(nexus);
    }
}

fn push(queue: &mut VecDeque<Asc>, asc: Asc) {
    if queue.contains(&asc) {
        return;
    }
    if queue.len() >= MAX_PENDING {
        queue.pop_front();
    }
    queue.push_back(asc);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nexus(i: u16) -> Nexus {
        Nexus {
            initiator_port: format!("i{i}"),
            target_port: "t".into(),
            relative_target_port: 1,
        }
    }

    #[test]
    fn queue_per_nexus() {
        let mut ua = UnitAttentions::default();
        let (a, b) = (nexus(1), nexus(2));
        ua.establish(&a, Asc::MODE_PARAMETERS_CHANGED);
        assert_eq!(ua.take(&a), None, "untracked nexuses get nothing");
        ua.touch(&a);
        ua.touch(&b);
        ua.establish_all(Asc::BUS_DEVICE_RESET_FUNCTION_OCCURRED, None);
        ua.establish_all(Asc::BUS_DEVICE_RESET_FUNCTION_OCCURRED, None);
        ua.establish_all(Asc::MODE_PARAMETERS_CHANGED, Some(&a));
        assert_eq!(ua.take(&a), Some(Asc::BUS_DEVICE_RESET_FUNCTION_OCCURRED));
        assert_eq!(ua.take(&a), None);
        assert_eq!(ua.take(&b), Some(Asc::BUS_DEVICE_RESET_FUNCTION_OCCURRED));
        assert_eq!(ua.take(&b), Some(Asc::MODE_PARAMETERS_CHANGED));
        for i in 0..20 {
            ua.establish(&b, Asc(0x2A, i));
        }
        assert_eq!(ua.take(&b), Some(Asc(0x2A, 12)));
        ua.forget(&b);
        assert_eq!(ua.take(&b), None);
    }
}
