"""HTCondor file-transfer plugin that stages VM universe disks as qcow2 copy-on-write
instances of base images on shared storage (``jobcage-transfer-plugin``)."""
