"""Launchers that run on your workstation: `tpu.py` (Cloud TPU VMs / pods, behind tpu_pod.sh)."""
