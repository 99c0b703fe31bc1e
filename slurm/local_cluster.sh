#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (root, no systemd), for the tests.
# Needs Debian's slurmctld slurmd slurm-client munge. Idempotent: an already
# answering controller is left as it is. Prints nothing on success.
set -euo pipefail

if sinfo -h >/dev/null 2>&1; then exit 0; fi
host=$(hostname -s)
cpus=$(nproc)
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))

# munge: shared-secret authentication, run as the munge user
mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=${host}
SlurmUser=root
AuthType=auth/munge
# requeued jobs restart after cred_expire + a scheduler pass: keep both short
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
# no slurmdbd: keep finished jobs visible to scontrol for a while
MinJobAge=3600
KillWait=30
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=${host} CPUs=${cpus} RealMemory=${memory} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

slurmctld
slurmd
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then exit 0; fi
  sleep 0.5
done
echo "SLURM did not come up; see /var/log/slurm/" >&2
exit 1
