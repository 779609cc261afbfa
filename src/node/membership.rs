//! Membership rules as pure functions of the cluster's state: what a
//! requested change becomes, which learner is ready to vote, and who takes
//! over from a leader asked to remove itself. The raft loop gathers the state
//! (conf state, member list, each peer's matched index), asks, and acts on
//! the answer; these functions never touch raft or storage.

use raft::prelude::ConfState;

use super::{Error, LeaderHint, MembershipChange};
use crate::proto::Member;
use crate::state_machine::{conf_ids, StateMeta};

/// A learner is promoted once its log is within this many entries of the
/// leader's commit index.
pub const PROMOTE_LAG: u64 = 1000;

/// What the cluster looks like to the leader deciding a change.
pub struct ClusterView<'a> {
    /// This node (the leader).
    pub me: u64,
    /// The members and the ids removed for good.
    pub state: &'a StateMeta,
    /// How far each peer's log matches the leader's (None: not tracked).
    pub matched: &'a dyn Fn(u64) -> Option<u64>,
}

/// What to do about a requested change.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Propose adding this node as a learner.
    AddLearner(Member),
    /// Propose removing this node.
    Remove(u64),
    /// The leader itself is to be removed: hand leadership to `to` first; the
    /// caller gets `refusal` and retries on the new leader.
    HandOver {
        /// The voter to transfer leadership to.
        to: u64,
        /// What the caller is told.
        refusal: Error,
    },
}

/// Decides a membership change on the leader, or says why it can't be made.
pub fn plan(change: MembershipChange, view: &ClusterView) -> Result<Plan, Error> {
    let conf = view.state.conf_state();
    let is_member = |id: u64| conf_ids(conf).any(|m| m == id);
    match change {
        MembershipChange::Add(member) => {
            if member.id == 0 {
                return Err(Error::Invalid("node id must be a positive integer".into()));
            }
            if is_member(member.id) {
                return Err(Error::MemberExists(format!(
                    "node {} is already a member; `kvraft members` lists them",
                    member.id
                )));
            }
            if view.state.is_removed(member.id) {
                return Err(Error::Invalid(format!(
                    "node id {} was removed from this cluster and can't be reused; add the node under a new id with an empty data dir",
                    member.id
                )));
            }
            if let Some(other) = view.state.members().iter().find(|m| m.peer_addr == member.peer_addr) {
                return Err(Error::Invalid(format!(
                    "peer address {} already belongs to node {}",
                    member.peer_addr, other.id
                )));
            }
            Ok(Plan::AddLearner(member))
        }
        MembershipChange::Remove(id) => {
            if !is_member(id) {
                return Err(Error::UnknownNode(format!(
                    "node {id} is not a member of this cluster; `kvraft members` lists them"
                )));
            }
            if conf.voters == [id] {
                return Err(Error::Invalid(format!(
                    "node {id} is the only voter; removing it would leave no cluster"
                )));
            }
            if id != view.me {
                return Ok(Plan::Remove(id));
            }
            match most_caught_up_voter(conf, view.me, view.matched) {
                Some(to) => Ok(Plan::HandOver {
                    to,
                    refusal: Error::NotLeader {
                        message: format!(
                            "node {id} leads and is being removed: leadership is moving to node {to}; retry"
                        ),
                        leader: Some(LeaderHint {
                            id: to,
                            client_addr: view.state.member(to).map(|m| m.client_addr.clone()).unwrap_or_default(),
                        }),
                    },
                }),
                None => Err(Error::NoLeader(
                    "no other voter is caught up to take over leadership; retry shortly".into(),
                )),
            }
        }
    }
}

/// The voter other than `me` whose log matches the most (ties: the higher id).
pub fn most_caught_up_voter(conf: &ConfState, me: u64, matched: &dyn Fn(u64) -> Option<u64>) -> Option<u64> {
    conf.voters
        .iter()
        .filter(|id| **id != me)
        .filter_map(|id| matched(*id).map(|m| (m, *id)))
        .max()
        .map(|(_, id)| id)
}

/// A learner close enough to the commit index to vote without slowing
/// commits down (the first such, in conf state order).
pub fn learner_to_promote(conf: &ConfState, committed: u64, matched: &dyn Fn(u64) -> Option<u64>) -> Option<u64> {
    conf.learners
        .iter()
        .copied()
        .find(|id| matched(*id).is_some_and(|m| m > 0 && m + PROMOTE_LAG >= committed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64) -> Member {
        Member {
            id,
            peer_addr: format!("n{id}:7380"),
            client_addr: format!("n{id}:7379"),
            role: 0,
            incarnation: 0,
        }
    }

    /// Voters 1, 2, 3; learner 4; node 5 removed earlier.
    fn cluster() -> StateMeta {
        let mut sm = StateMeta::new(7);
        let mut conf = ConfState::default();
        for id in [1, 2, 3, 5] {
            conf.voters.push(id);
            sm.apply_conf_state(0, 0, conf.clone(), Some(member(id)));
        }
        conf.learners.push(4);
        sm.apply_conf_state(0, 0, conf.clone(), Some(member(4)));
        conf.voters.retain(|id| *id != 5);
        sm.apply_conf_state(0, 0, conf, None);
        sm
    }

    fn matched(id: u64) -> Option<u64> {
        [(2, 90), (3, 100), (4, 50)]
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, m)| *m)
    }

    fn plan_on(sm: &StateMeta, change: MembershipChange) -> Result<Plan, Error> {
        plan(
            change,
            &ClusterView {
                me: 1,
                state: sm,
                matched: &matched,
            },
        )
    }

    #[test]
    fn an_add_is_checked_against_members_removed_ids_and_addresses() {
        let sm = cluster();
        assert_eq!(
            plan_on(&sm, MembershipChange::Add(member(6))),
            Ok(Plan::AddLearner(member(6)))
        );
        assert!(matches!(
            plan_on(&sm, MembershipChange::Add(member(0))),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            plan_on(&sm, MembershipChange::Add(member(2))),
            Err(Error::MemberExists(_))
        ));
        assert!(matches!(
            plan_on(&sm, MembershipChange::Add(member(4))),
            Err(Error::MemberExists(_))
        ));
        let reused = plan_on(&sm, MembershipChange::Add(member(5))).unwrap_err();
        assert!(reused.to_string().contains("was removed from this cluster"), "{reused}");
        let taken = Member { id: 6, ..member(3) };
        let clash = plan_on(&sm, MembershipChange::Add(taken)).unwrap_err();
        assert!(clash.to_string().contains("already belongs to node 3"), "{clash}");
    }

    #[test]
    fn a_remove_is_checked_and_the_leader_hands_over_before_removing_itself() {
        let sm = cluster();
        assert_eq!(plan_on(&sm, MembershipChange::Remove(2)), Ok(Plan::Remove(2)));
        assert_eq!(plan_on(&sm, MembershipChange::Remove(4)), Ok(Plan::Remove(4)));
        assert!(matches!(
            plan_on(&sm, MembershipChange::Remove(9)),
            Err(Error::UnknownNode(_))
        ));
        match plan_on(&sm, MembershipChange::Remove(1)).unwrap() {
            Plan::HandOver {
                to,
                refusal: Error::NotLeader { leader: Some(hint), .. },
            } => {
                assert_eq!(to, 3, "the voter with the most matched entries");
                assert_eq!(
                    hint,
                    LeaderHint {
                        id: 3,
                        client_addr: "n3:7379".into()
                    }
                );
            }
            other => panic!("{other:?}"),
        }
        let none = plan(
            MembershipChange::Remove(1),
            &ClusterView {
                me: 1,
                state: &sm,
                matched: &|_| None,
            },
        );
        assert!(matches!(none, Err(Error::NoLeader(_))), "{none:?}");
    }

    #[test]
    fn the_only_voter_is_never_removed() {
        let mut sm = StateMeta::new(7);
        let mut conf = ConfState::default();
        conf.voters.push(1);
        sm.apply_conf_state(0, 0, conf, Some(member(1)));
        let err = plan(
            MembershipChange::Remove(1),
            &ClusterView {
                me: 1,
                state: &sm,
                matched: &matched,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("only voter"), "{err}");
    }

    #[test]
    fn a_learner_is_promoted_once_within_the_lag_and_not_before_it_has_anything() {
        let mut conf = ConfState::default();
        conf.learners = vec![4, 6];
        let at = |m4: u64, m6: u64| move |id: u64| Some(if id == 4 { m4 } else { m6 });
        assert_eq!(
            learner_to_promote(&conf, 2000, &at(999, 0)),
            None,
            "1001 behind, and nothing"
        );
        assert_eq!(learner_to_promote(&conf, 2000, &at(1000, 0)), Some(4));
        assert_eq!(
            learner_to_promote(&conf, 10, &at(0, 5)),
            Some(6),
            "matched 0 never counts"
        );
        assert_eq!(learner_to_promote(&conf, 10, &|_| None), None);
    }
}
