"""The ZeroMQ bus between the frontend and the daemons."""
