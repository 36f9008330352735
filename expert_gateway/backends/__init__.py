"""Expert backends behind the gateway's ``ExpertBackend`` protocol."""
