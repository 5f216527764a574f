//! # iscsi-target — portals, TPGs, targets, discovery, login policy (iscsit's role)
