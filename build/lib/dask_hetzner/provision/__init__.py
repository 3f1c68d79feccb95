"""Provisioning: everything between "this cluster needs a server" and "the server is ready".

One module per job: the shared resources (``shared``), creating and reaching one server
(``servers``), building a node's server (``node``), the tasks that provision ahead of
``SpecCluster`` (``tasks``), where workers find their scheduler (``meeting``), host-key
pins (``pins``), and what a cluster's nodes share (``context``). Nodes call provisioning;
provisioning never calls back into the nodes or the cluster.
"""
