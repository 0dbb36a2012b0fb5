#!/usr/bin/env bash
# A one-node SLURM cluster on this machine from Debian's packages, for the SLURM profile test
# (tests/test_slurm_profile.py): munge, slurmctld and slurmd on localhost, partition "debug".
#
#   .ci/slurm-setup.sh          install (apt), configure and start; a no-op when it already runs
#   .ci/slurm-setup.sh stop     stop the daemons this script started (packages and config stay)
#
# Best effort: when SLURM cannot be installed or started it prints a warning, stops what it
# started and exits 0, so CI goes on and the test that needs SLURM skips. Runs as root (or
# re-runs itself through passwordless sudo). No slurmdbd: AccountingStorageType is
# accounting_storage/none, so `sacct` has no data and the Snakemake SLURM plugin polls job
# states with `squeue` (MinJobAge keeps finished jobs visible to it for 10 minutes).
set -uo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="# Written by fomaml-math .ci/slurm-setup.sh"
RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm
PARTITION=debug
START=$(date +%s)

log() { echo "slurm-setup: $*"; }
# Never fail CI: warn, stop whatever this run started, exit 0.
give_up() {
	echo "slurm-setup: WARNING: $* -- no SLURM; tests that need it will skip" >&2
	stop_daemons
	exit 0
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_daemons() {
	local name pidfile
	for name in slurmd slurmctld; do
		pidfile="$RUN_DIR/$name.pid"
		if pid_alive "$pidfile"; then
			kill "$(cat "$pidfile")" 2>/dev/null
			for _ in $(seq 20); do pid_alive "$pidfile" || break; sleep 0.5; done
			log "stopped $name"
		fi
	done
	if [[ -s /run/munge/munged.pid ]] && pid_alive /run/munge/munged.pid && [[ -e $RUN_DIR/munged.ours ]]; then
		kill "$(cat /run/munge/munged.pid)" 2>/dev/null && log "stopped munged"
		rm -f "$RUN_DIR/munged.ours"
	fi
}

cluster_up() {
	# The partition answers and its node can take jobs (idle, mixed or allocated).
	command -v sinfo >/dev/null 2>&1 &&
		timeout 10 sinfo -h -p "$PARTITION" -o '%a %t' 2>/dev/null | grep -Eq '^up (idle|mix|alloc)'
}

if [[ $(id -u) -ne 0 ]]; then
	if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
		exec sudo -n "$0" "$@"
	fi
	echo "slurm-setup: WARNING: needs root (or passwordless sudo); no SLURM, tests that need it will skip" >&2
	exit 0
fi

if [[ ${1:-} == stop ]]; then
	stop_daemons
	exit 0
fi

# Our own cluster with slurmctld stopped needs no asking (sinfo takes ~10 s to give up on it).
ours_stopped() { [[ -e $CONF ]] && grep -qF "$MARKER" "$CONF" && ! pid_alive "$RUN_DIR/slurmctld.pid"; }
if ! ours_stopped && cluster_up; then
	log "SLURM already up (partition $PARTITION); nothing to do"
	exit 0
fi

# 1. Packages (8 .debs; 17 s with apt-get update on a 2-core VM): munge, slurmctld, slurmd, slurm-client.
# Every step below has a time limit: at worst the script gives up after about 4 minutes.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null ||
	! command -v munged >/dev/null; then
	command -v apt-get >/dev/null || give_up "no apt-get (not Debian/Ubuntu)"
	export DEBIAN_FRONTEND=noninteractive
	log "installing munge slurmctld slurmd slurm-client"
	timeout 60 apt-get update -qq || log "apt-get update failed; trying the package lists there are"
	# Debian's postinst would start the daemons through systemd/invoke-rc.d; this script starts them.
	timeout 120 apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=60 \
		munge slurmctld slurmd slurm-client >/dev/null || give_up "apt-get install failed"
fi

# 2. Configuration for this one node, from what slurmd detects (CPUs, sockets, cores, memory).
if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
	give_up "$CONF exists and was not written by this script; leaving it alone"
fi
detected=$(slurmd -C 2>/dev/null | head -1)
node=$(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' <<<"$detected")
mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$detected")
[[ -n $node && -n $mem ]] || give_up "slurmd -C detected no node ($detected)"
# Leave a tenth of the memory to the OS; slurmd drains a node that has less than it declares.
hw=$(sed -e 's/^NodeName=[^ ]* //' -e 's/ *RealMemory=[0-9]*//' <<<"$detected")
mkdir -p "$CONF_DIR"
cat >"$CONF.new" <<EOF
$MARKER: a one-node test cluster.
ClusterName=ci
SlurmctldHost=$node(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# No cgroups (containers often lack them): plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: no accounts to validate, sacct has no data; squeue sees jobs for MinJobAge s.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
MinJobAge=600
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmdTimeout=60
NodeName=$node NodeAddr=127.0.0.1 $hw RealMemory=$((mem * 9 / 10)) State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$CONF.new" "$CONF"; then
	mv "$CONF.new" "$CONF"
	log "wrote $CONF ($node: $hw RealMemory=$((mem * 9 / 10)))"
	# A changed config needs restarted daemons.
	stop_daemons
else
	rm -f "$CONF.new"
fi
install -d -o slurm -g slurm -m 0755 "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"

# 3. Daemons: munged (as user munge), slurmctld, slurmd.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
	[[ -s /etc/munge/munge.key ]] || { mungekey --create 2>/dev/null || give_up "no munge key"; }
	chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
	install -d -o munge -g munge -m 0755 /run/munge
	runuser -u munge -- /usr/sbin/munged || give_up "munged did not start"
	touch "$RUN_DIR/munged.ours"
	for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
	munge -n | unmunge >/dev/null 2>&1 || give_up "munge does not answer"
	log "started munged"
fi
if ! pid_alive "$RUN_DIR/slurmctld.pid"; then
	slurmctld || give_up "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
	log "started slurmctld"
fi
if ! pid_alive "$RUN_DIR/slurmd.pid"; then
	slurmd || give_up "slurmd did not start (see $LOG_DIR/slurmd.log)"
	log "started slurmd"
fi

# 4. Wait for the node, then run one job through it.
deadline=$((SECONDS + 45))
while ((SECONDS < deadline)); do cluster_up && break; sleep 1; done
if ! cluster_up; then
	# A node left down/drained by an earlier run comes back with a resume.
	scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1
	sleep 2
	cluster_up || give_up "partition $PARTITION not up: $(sinfo -h -N -o '%N %t %E' 2>&1 | head -3)"
fi
if ! out=$(timeout 30 srun -p "$PARTITION" -N1 -n1 -t 1 --mem 100 hostname 2>&1); then
	give_up "a test job did not run: $out"
fi
log "SLURM up in $(($(date +%s) - START)) s: partition $PARTITION, node $node ($hw); test job ran on $out"
