"""Post-hoc EMA from EMA snapshots (Karras et al. 2024, EDM2): each snapshot's profile, the solve."""
