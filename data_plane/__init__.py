"""The ZEN (data plane): the TLS-inspecting proxy that holds org keys only in
locked, zeroed RAM. It never imports the control plane.

So far this package holds the ZEN's key opening (:mod:`data_plane.keyopen`);
the proxy itself is issue 4.
"""
