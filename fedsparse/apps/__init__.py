"""The Flower apps and what composes them: ServerApp, ClientApp, the server's recorder, the simulation and the central reference."""
