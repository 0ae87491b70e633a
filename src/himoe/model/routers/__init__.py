"""Routers: the contract they keep (base), the registry of router types (registry), the
card's two-level router (hierarchical) and the routers over all experts at once (flat)."""
