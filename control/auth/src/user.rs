use std::collections::BTreeMap;

/// The group of the superusers, whom no authorizer refuses.
pub const MASTERS: &str = "system:masters";
/// The group every authenticated request is in.
pub const AUTHENTICATED: &str = "system:authenticated";
/// The group every node agent is in.
pub const NODES: &str = "system:nodes";
/// The group every ServiceAccount is in.
pub const SERVICE_ACCOUNTS: &str = "system:serviceaccounts";
/// The user of a request without credentials.
pub const ANONYMOUS: &str = "system:anonymous";

/// Who a request is, as authentication found (kube's `user.Info`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    pub fn new(name: impl Into<String>, groups: &[&str]) -> Self {
        Self {
            name: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ..Self::default()
        }
    }

    /// The user a ServiceAccount's token stands for, with its groups.
    pub fn service_account(namespace: &str, name: &str, uid: &str) -> Self {
        Self {
            name: format!("system:serviceaccount:{namespace}:{name}"),
            uid: uid.to_string(),
            groups: vec![
                SERVICE_ACCOUNTS.to_string(),
                format!("{SERVICE_ACCOUNTS}:{namespace}"),
                AUTHENTICATED.to_string(),
            ],
            extra: BTreeMap::new(),
        }
    }

    /// Adds `system:authenticated`, as every authenticator's result gets.
    pub fn authenticated(mut self) -> Self {
        if !self.in_group(AUTHENTICATED) {
            self.groups.push(AUTHENTICATED.to_string());
        }
        self
    }

    pub fn in_group(&self, g: &str) -> bool {
        self.groups.iter().any(|x| x == g)
    }

    pub fn is_superuser(&self) -> bool {
        self.in_group(MASTERS)
    }

    /// The ServiceAccount (namespace, name) this user is, if it is one.
    pub fn as_service_account(&self) -> Option<(&str, &str)> {
        service_account_of(&self.name)
    }

    /// The ServiceAccount (namespace, name) a user name stands for, if it does.
    pub fn service_account_parts(name: &str) -> Option<(String, String)> {
        service_account_of(name).map(|(n, s)| (n.to_string(), s.to_string()))
    }

    /// The node this user is (`system:node:NAME` in `system:nodes`), if it is one.
    pub fn as_node(&self) -> Option<&str> {
        let name = self.name.strip_prefix("system:node:")?;
        (self.in_group(NODES) && !name.is_empty()).then_some(name)
    }
}

fn service_account_of(user: &str) -> Option<(&str, &str)> {
    let rest = user.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains(':')).then_some((ns, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_accounts_and_nodes_are_recognized() {
        let sa = UserInfo::service_account("ns", "app", "u1");
        assert_eq!(sa.as_service_account(), Some(("ns", "app")));
        assert!(sa.in_group("system:serviceaccounts:ns"));
        assert_eq!(
            UserInfo::new("system:serviceaccount:ns", &[]).as_service_account(),
            None
        );
        assert_eq!(
            UserInfo::new("system:node:n1", &[NODES]).as_node(),
            Some("n1")
        );
        // The name alone is not enough: a user named like a node is not one.
        assert_eq!(UserInfo::new("system:node:n1", &[]).as_node(), None);
    }
}
