"""The QuantizationJob operator (Kopf): one job's trials fanned out as pods on the Xeon pool.

Small modules, one concern each:
  constants  names shared by the modules (group, labels, object names)
  config     OperatorConfig: settings from the command line / environment (signing key included)
  crd        the CRD generated from the pydantic spec and status models (`python -m qtune.operator.crd`)
  layout     a job's identity, labels, owner reference, workspace folders
  builders   pure builders of a unit's pod, inputs ConfigMap and Secret
  rbac       the baseline pod's Role/RoleBinding (publishing the tuning space), bound only during the baseline
  admission  what a job may choose of its pods (image, workspace PVC, tolerations), pinned before the first pod
  podstatus  pod summaries (the pod index) and how a failed pod's end is read
  results    proof of origin: which observed results the operator may believe
  prom       async Prometheus HTTP API and Pushgateway clients (results decoded by qtune.protocol)
  status     the JobStatus model and projections of the session into it
  store      the job history in a ConfigMap (qtune.protocol's ConfigMap codec), signed by the operator
  spaces     the baseline's published tuning space: decoded once, only with the hash its signed result names
  kube       async wrappers of the Kubernetes client (calls run in threads)
  reconcile  one turn of the tuning loop: observe -> session.record_* -> session.advance -> apply
  metrics    the operator's own Prometheus metrics
  folders    a deleted job's workspace folder: the short pod deleting it
  handlers   the thin Kopf handlers
  main       `qtune operator`: settings, peering, health and metrics endpoints

The operator never imports onnxruntime or torch: everything it needs from the model (the tuning
space and the fp32 baseline) comes from the baseline pod through a ConfigMap.
"""
