-- Orthanc -> aenode, each stable study in one association (fastest completion). Skips what
-- aenode itself sent back. Modality 'aenode' in DicomModalities; set StableAge low (1-5 s).
-- The check is one metadata read per series, not per instance (a 1,000-slice CT would cost
-- 1,000 REST calls before the first byte left): aenode's results are whole series of their
-- own (SEG, SC, SR), so the first instance of a series tells who sent it.
function OnStableStudy(studyId, tags, metadata)
  local ids = {}
  for _, s in pairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    local first = s['Instances'][1]
    if first ~= nil then  -- a series emptied meanwhile has nothing to send
      local ok, aet = pcall(RestApiGet, '/instances/' .. first .. '/metadata/RemoteAET')
      if not ok or aet ~= 'AENODE' then
        table.insert(ids, s['ID'])
      end
    end
  end
  if #ids > 0 then
    RestApiPost('/modalities/aenode/store', DumpJson(ids))
  end
end
