"""One cluster seen from the desktop: the SSH carriers, the bundle upload, the agent
client (the ZeroMQ message pump) and the stager. Nothing here runs on the cluster."""
