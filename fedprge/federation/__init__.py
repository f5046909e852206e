"""The federation on Flower: wire protocol, server strategy, ServerApp and ClientApp."""
