"""Router types: the registry of what each router states (registry.py); the built-in
routers' modules are in himoe.model.routing."""
