-- Argo CD health of a NodeTuningProfile, from its kstatus conditions:
-- Healthy when Ready=True for the current generation, Degraded when Stalled=True (some node
-- cannot finish without a change: keys Unsupported, Invalid, Denied or Failed), Progressing
-- otherwise (no status yet, a generation not yet observed, agents still rolling out, a staged
-- rollout sending its waves). A staged rollout paused by the user (not by a guard) is Suspended.
local hs = {}
local function condition(t)
  if obj.status ~= nil and obj.status.conditions ~= nil then
    for _, c in ipairs(obj.status.conditions) do
      if c.type == t then
        return c
      end
    end
  end
  return nil
end
local function current(c)
  return c.observedGeneration == nil or c.observedGeneration == obj.metadata.generation
end
if obj.status == nil or obj.status.observedGeneration ~= obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the controller to observe generation " .. tostring(obj.metadata.generation)
  return hs
end
local rollout = obj.status.rollout
if rollout ~= nil and rollout.phase == "Paused" and rollout.failure == nil then
  hs.status = "Suspended"
  hs.message = rollout.message or "Rollout paused"
  return hs
end
local stalled = condition("Stalled")
if stalled ~= nil and stalled.status == "True" and current(stalled) then
  hs.status = "Degraded"
  hs.message = stalled.message or stalled.reason or "Stalled"
  return hs
end
local ready = condition("Ready")
if ready ~= nil and ready.status == "True" and current(ready) then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  return hs
end
hs.status = "Progressing"
local reconciling = condition("Reconciling")
if reconciling ~= nil and reconciling.status == "True" then
  hs.message = reconciling.message or reconciling.reason or "Reconciling"
elseif ready ~= nil and ready.message ~= nil then
  hs.message = ready.message
else
  hs.message = "Waiting for the profile to become Ready"
end
return hs
