"""Transport: SSH to the head node (ssh.py) and the authenticated messages (messages.py)
that travel over ZeroMQ through an SSH port forward."""
