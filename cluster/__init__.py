"""How it runs: the embedded local stack and the deployment assets for Ray clusters."""
